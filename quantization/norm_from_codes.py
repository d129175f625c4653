"""GroupNorm that keeps its input as int8 codes for backward and decodes it a slice at a time.

On the low-precision path a GroupNorm's input is a quantizer's output, ``code * step`` with one
exponent. Autograd's own GroupNorm saves that input, and ``saved_as_codes`` already keeps it as
its codes (one byte an element), but the backward pass unpacks the whole float32 tensor before
it starts: at the first block of the paper's ConvNet that is 16 MiB more, at the moment the
step's memory peaks. ``attach_group_norm_from_codes`` reroutes ``nn.GroupNorm`` so that its
backward decodes the codes a few samples at a time and runs ATen's own GroupNorm backward on
each slice.

Numbers: GroupNorm normalizes each sample on its own, so the input's gradient is ATen's, bit
for bit. The weight's and bias's gradients sum over the samples; here they are summed slice by
slice in float64, so they can differ from ATen's single sum in the last float32 bit.
"""

from __future__ import annotations

import torch
from torch import nn

from .grid_codes import attached_codes, values_of_codes
from .quantizer import memory_format_of
from .rerouting import ReroutedModules

#: Bytes of float32 input a backward slice decodes at most (at least one sample).
SLICE_BYTES = 1 << 18


class _GroupNormFromCodes(torch.autograd.Function):
    """``group_norm(x)`` for an ``x`` given as its codes too; backward reads the codes."""

    @staticmethod
    def forward(ctx, x, codes, step, weight, bias, groups, eps):  # type: ignore[override]
        ctx.memory_format = memory_format_of(x)
        x = x.contiguous(memory_format=ctx.memory_format)  # as ATen's group_norm hands it on
        n, c = x.shape[:2]
        per_channel = x.numel() // max(n * c, 1)
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, per_channel, groups, eps)
        ctx.sizes = (n, c, per_channel, groups)
        ctx.save_for_backward(codes, step, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        codes, step, mean, rstd, weight = ctx.saved_tensors
        n, c, per_channel, groups = ctx.sizes
        wants = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        grad = grad.contiguous(memory_format=ctx.memory_format)
        grad_x = torch.empty_like(grad) if wants[0] else None
        sums = torch.zeros(2, c, dtype=torch.float64)  # weight's and bias's gradients
        rows = max(1, SLICE_BYTES // max(4 * c * per_channel, 1))
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            parts = torch.ops.aten.native_group_norm_backward(
                grad[start:stop], values_of_codes(codes[start:stop], step),
                mean[start:stop], rstd[start:stop], weight,
                stop - start, c, per_channel, groups, wants,
            )  # fmt: skip
            if grad_x is not None:
                grad_x[start:stop].copy_(parts[0])
            for row, part in enumerate(parts[1:]):
                if part is not None:
                    sums[row] += part
        grad_weight, grad_bias = (
            sums[row].to(weight.dtype) if wants[row + 1] else None for row in range(2)
        )
        return grad_x, None, None, grad_weight, grad_bias, None, None


def _group_norm(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    attached = attached_codes(x)
    if attached is None or x.device.type != "cpu" or x.dim() < 2:
        groups, eps = module.num_groups, module.eps
        return nn.functional.group_norm(x, groups, module.weight, module.bias, eps)
    codes, step = attached
    return _GroupNormFromCodes.apply(
        x, codes, step, module.weight, module.bias, module.num_groups, module.eps
    )


def attach_group_norm_from_codes(model: nn.Module) -> ReroutedModules:
    """Make every ``nn.GroupNorm`` of ``model`` whose input carries quantizer codes
    (``attach_quantizers(..., keep_codes=True)``) save those codes, not a float32 input, and
    decode them a slice at a time in backward. Other inputs take the plain GroupNorm.
    ``remove()`` on the result restores them."""
    rerouted = ReroutedModules()
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            rerouted.reroute(module, lambda x, m=module: _group_norm(m, x))
    return rerouted
