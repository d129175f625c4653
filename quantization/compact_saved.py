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
from torch.nn.modules.utils import _pair

from ._saved_kernels import positive_bits, zero_where_clear_
from .fake_quant import Quantizer
from .grid_codes import attached_codes, quantize_with_codes, values_of_codes
from .quantizer import memory_format_of, quantize
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


class _ReLUWithBits(torch.autograd.Function):
    """``relu(x)`` that saves ``relu(x) > 0`` as bits for backward; with a quantizer, also
    its output quantizer fused in (the activation in place on ReLU's own output, the error
    in place on the quantizer's own result), as the quantizer's forward hook would apply it."""

    @staticmethod
    def forward(ctx, x, quantizer):  # type: ignore[override]
        ctx.memory_format = memory_format_of(x)
        ctx.quantizer = quantizer
        out = torch.relu(x).contiguous(memory_format=ctx.memory_format)
        ctx.save_for_backward(positive_bits(out))
        if quantizer is None or not quantizer.forward_fmt.enabled:
            return out
        if quantizer.keep_codes:  # lazily: a pooling layer, say, never reads them
            fmt, generator = quantizer.forward_fmt, quantizer.generator
            return quantize_with_codes(out, fmt, generator, in_place=True, lazy=True)
        return quantize(out, quantizer.forward_fmt, quantizer.generator)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        masked = grad.contiguous(memory_format=ctx.memory_format)
        if ctx.quantizer is not None:  # the error the quantizer's backward would hand on
            masked = quantize(masked, ctx.quantizer.backward_fmt, ctx.quantizer.generator)
        if masked.data_ptr() == grad.data_ptr():  # never write the gradient autograd passed
            masked = masked.clone(memory_format=ctx.memory_format)
        return zero_where_clear_(masked, bits), None


def _masks_as_bits(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.requires_grad


def attach_masked_relu(model: nn.Module, quantizer: Quantizer | None = None) -> ReroutedModules:
    """Make every ``nn.ReLU`` of ``model`` save one bit an element for backward instead of its
    float32 output (the same values and gradients; an in-place ReLU then works out of place).

    ``quantizer``: these ReLUs also quantize their outputs and errors with it, in place, as
    ``attach_quantizers`` would; attach the quantizers with ``skip=relus_of(model)`` then.
    Tensors other than float32 on the CPU take ReLU (and the quantizer) as they are.
    ``remove()`` on the result restores them."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _masks_as_bits(x):
            return _ReLUWithBits.apply(x, quantizer)
        return torch.relu(x) if quantizer is None else quantizer(torch.relu(x))

    rerouted = ReroutedModules()
    for module in relus_of(model):
        rerouted.reroute(module, forward)
    return rerouted


def relus_of(model: nn.Module) -> list[nn.Module]:
    """The ``nn.ReLU`` modules (not subclasses) of ``model``, ``model`` itself included."""
    return [m for m in model.modules() if type(m) is nn.ReLU]


class _AvgPool2dSavingShape(torch.autograd.Function):
    """``avg_pool2d`` whose backward keeps only the input's shape: its gradient depends on
    nothing else (autograd's own keeps the whole input)."""

    @staticmethod
    def forward(ctx, x, pooling):  # type: ignore[override]
        ctx.shape, ctx.memory_format, ctx.pooling = x.shape, memory_format_of(x), pooling
        return nn.functional.avg_pool2d(x, *pooling)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        shape_only = grad.new_empty(()).expand(ctx.shape)  # no memory behind it
        grad_in = torch.ops.aten.avg_pool2d_backward(grad, shape_only, *ctx.pooling)
        return grad_in.contiguous(memory_format=ctx.memory_format), None


def attach_shape_only_pooling(model: nn.Module) -> ReroutedModules:
    """Make every ``nn.AvgPool2d`` of ``model`` keep only its input's shape for backward (the
    same values and gradients). ``remove()`` on the result restores them."""
    rerouted = ReroutedModules()
    for module in model.modules():
        if type(module) is nn.AvgPool2d:
            kernel = _pair(module.kernel_size)
            pooling = (
                kernel,
                _pair(module.stride if module.stride is not None else kernel),
                _pair(module.padding),
                module.ceil_mode,
                module.count_include_pad,
                module.divisor_override,
            )
            rerouted.reroute(module, lambda x, p=pooling: _AvgPool2dSavingShape.apply(x, p))
    return rerouted
