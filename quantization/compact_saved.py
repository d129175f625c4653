"""Keep what autograd saves for backward compact, without changing a single number.

A float32 training step keeps, for backward, most layers' inputs or outputs: GroupNorm and
pooling their inputs, ReLU its output, four bytes an element. On the low-precision path most of
these tensors are quantizer outputs, exactly ``code * step`` with one exponent, so one byte an
element holds them (``grid_codes``); and ReLU's backward reads only where its output is
positive, so a one-byte mask holds what it needs.

* ``saved_as_codes()``: a context for the forward pass; every saved tensor that carries valid
  codes (``attach_quantizers(..., keep_codes=True)``) is kept as those codes and decoded, bit
  for bit, when backward unpacks it.
* ``attach_masked_relu(model)``: ``nn.ReLU`` layers save a bool mask instead of their output;
  their backward is ReLU's own (``threshold_backward``) on the mask as 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .grid_codes import attached_codes, values_of_codes
from .rerouting import ReroutedModules


@dataclass(frozen=True)
class _SavedCodes:
    """A tensor autograd saved for backward, kept as its codes (decoded when unpacked)."""

    codes: torch.Tensor
    step: torch.Tensor
    requires_grad: bool


def pack_saved(t: torch.Tensor) -> torch.Tensor | _SavedCodes:
    """Autograd's pack hook: a saved tensor that carries valid codes is kept as those codes
    (one byte an element instead of four); any other tensor as itself."""
    attached = attached_codes(t)
    if attached is None:
        return t
    return _SavedCodes(*attached, t.requires_grad)


def unpack_saved(packed: torch.Tensor | _SavedCodes) -> torch.Tensor:
    """Autograd's unpack hook: the float32 values ``code * step``, exactly the saved ones."""
    if not isinstance(packed, _SavedCodes):
        return packed
    return values_of_codes(packed.codes, packed.step).requires_grad_(packed.requires_grad)


def saved_as_codes() -> torch.autograd.graph.saved_tensors_hooks:
    """Context for the forward pass: saved tensors that came out of a quantizer with
    ``keep_codes`` are kept as int8 codes; backward sees bit-identical values."""
    return torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved)


class _ReLUWithMask(torch.autograd.Function):
    """``relu(x)`` that saves ``relu(x) > 0`` (one byte an element) for backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out = torch.relu(x)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (positive,) = ctx.saved_tensors
        # ReLU's own backward on a 0/1 stand-in for its output (torch.where on a bool mask
        # is several times slower on CPU); a uint8 view converts fastest
        stand_in = positive.view(torch.uint8).to(grad.dtype)
        return torch.ops.aten.threshold_backward(grad, stand_in, 0)


def attach_masked_relu(model: nn.Module) -> ReroutedModules:
    """Make every ``nn.ReLU`` of ``model`` save a bool mask for backward instead of its
    float32 output (the same values and gradients; an in-place ReLU then works out of place).
    ``remove()`` on the result restores them."""
    rerouted = ReroutedModules()
    for module in model.modules():
        if type(module) is nn.ReLU:
            rerouted.reroute(module, _ReLUWithMask.apply)
    return rerouted
