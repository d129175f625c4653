"""One call that makes a model train in low precision, with either arithmetic.

``attach_low_precision(model, precision, generator, arithmetic)`` attaches the activation and
error quantizers (``attach_quantizers``) and, for ``arithmetic="int8"``, also reroutes conv and
linear layers onto integer products (``integer_arithmetic``), makes ReLUs save 1-byte masks and
keeps the codes the quantizers hand over as what autograd saves (``compact_saved``). Run each
forward pass inside ``forward()`` and each optimizer step through ``optimizer_step()`` (on
the int8 path it keeps weights as int8 codes between steps); ``remove()`` (or leaving the
``with`` block) restores the model. Used by the ClientApp's training loop and by the
benchmarks, so both train the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .compact_saved import (
    attach_masked_relu,
    attach_shape_only_pooling,
    relus_of,
    saved_as_codes,
)
from .fake_quant import QuantizerHooks, attach_quantizers
from .integer_arithmetic import IntegerArithmetic, attach_integer_arithmetic
from .norm_from_codes import attach_group_norm_from_codes
from .precision import TrainingPrecision

#: ``train.arithmetic``: float32 products of grid values, or int8 products of their codes.
ARITHMETICS = ("fake", "int8")


class _Removable(Protocol):
    def remove(self) -> None: ...


class _Steppable(Protocol):
    def step(self) -> object: ...


@dataclass
class LowPrecisionLayers:
    """What ``attach_low_precision`` put on a model: the quantizers, and for int8 the rerouted
    layers; ``forward()`` is the context each forward pass runs in."""

    quantizers: QuantizerHooks
    arithmetic: str
    rerouted: list[_Removable] = field(default_factory=list)
    forward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    integer: IntegerArithmetic | None = None

    def optimizer_step(self, optimizer: _Steppable, park_weights: bool = True) -> None:
        """``optimizer.step()`` on float32 weights; then, on the int8 path, the weights of the
        layers that computed on integers are kept as int8 codes and steps only until the next
        step (``IntegerArithmetic.park_weights``), unless ``park_weights`` is false (FedProx,
        whose proximal term reads the float32 weights in every forward pass)."""
        if self.integer is not None:
            self.integer.unpark_weights()
        optimizer.step()
        if self.integer is not None and park_weights:
            self.integer.park_weights()

    def parked_weight_bytes(self) -> int:
        """Bytes of the weights kept as codes (0 on the fake-quant path)."""
        return 0 if self.integer is None else self.integer.parked_bytes()

    def remove(self) -> None:
        """Detach everything, restoring the model's own float32 forward pass."""
        self.quantizers.remove()
        for attachment in self.rerouted:
            attachment.remove()
        self.rerouted.clear()

    def __enter__(self) -> LowPrecisionLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_low_precision(
    model: nn.Module,
    precision: TrainingPrecision,
    generator: torch.Generator | None = None,
    arithmetic: str = "fake",
) -> LowPrecisionLayers:
    """Quantize ``model``'s activations and errors to ``precision``; with ``arithmetic="int8"``
    compute its conv and linear products on integer codes (the same function: integer sums
    are exact) and keep int8 codes and ReLU masks for backward instead of float32 tensors.

    Pair it with a ``LowPrecisionOptimizer`` of the same precision, which keeps weights,
    gradients and state on their grids. Raises ``ValueError`` for an unknown arithmetic.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"unknown arithmetic {arithmetic!r}: use one of {ARITHMETICS}")
    if arithmetic == "fake":
        quantizers = attach_quantizers(model, precision.activation, precision.error, generator)
        return LowPrecisionLayers(quantizers, arithmetic)
    relus = relus_of(model)  # they quantize their own outputs, saving bit masks
    quantizers = attach_quantizers(
        model, precision.activation, precision.error, generator, keep_codes=True, skip=relus
    )
    layers = LowPrecisionLayers(quantizers, arithmetic, forward=saved_as_codes)
    try:
        layers.integer = attach_integer_arithmetic(model, precision)
        layers.rerouted.append(layers.integer)
        layers.rerouted.append(attach_masked_relu(model, quantizers.quantizer))
        layers.rerouted.append(attach_shape_only_pooling(model))
        layers.rerouted.append(attach_group_norm_from_codes(model))
    except BaseException:
        layers.remove()  # leave the model as it was given
        raise
    return layers
