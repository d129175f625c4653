"""Fake quantization for training: activations in the forward pass, errors in the backward pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .format import BlockFloat
from .grid_codes import quantize_with_codes
from .quantizer import memory_format_of, quantize

#: Module types whose outputs the reference code quantizes: after conv/linear, after
#: (norm +) activation and after pooling. The model's output is quantized too.
QUANTIZED_OUTPUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


class _QuantizeForwardBackward(torch.autograd.Function):
    """Identity whose output is quantized to one format and whose gradient to another."""

    @staticmethod
    def forward(ctx, x, forward_fmt, backward_fmt, generator, keep_codes):  # type: ignore[override]
        ctx.backward_fmt = backward_fmt
        ctx.generator = generator
        ctx.memory_format = memory_format_of(x)
        ctx.keep_codes = keep_codes
        if keep_codes:
            return quantize_with_codes(x, forward_fmt, generator)
        return quantize(x, forward_fmt, generator)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # the error in the activation's own memory order: elementwise backward ops that meet
        # two orders (saved activation, incoming error) fall off their vectorized paths
        grad = grad.contiguous(memory_format=ctx.memory_format)
        if ctx.keep_codes:  # only an integer layer's backward reads an error's codes
            error = quantize_with_codes(grad, ctx.backward_fmt, ctx.generator, lazy=True)
        else:
            error = quantize(grad, ctx.backward_fmt, ctx.generator)
        return error, None, None, None, None


def quantize_flow(
    x: torch.Tensor,
    forward_fmt: BlockFloat,
    backward_fmt: BlockFloat,
    generator: torch.Generator | None = None,
    keep_codes: bool = False,
) -> torch.Tensor:
    """Quantize ``x`` with ``forward_fmt`` and the gradient flowing back with ``backward_fmt``;
    ``keep_codes``: both also carry their integer codes for an integer layer (``grid_codes``)."""
    if not (forward_fmt.enabled or backward_fmt.enabled) or not x.is_floating_point():
        return x
    return _QuantizeForwardBackward.apply(x, forward_fmt, backward_fmt, generator, keep_codes)


class Quantizer(nn.Module):
    """A fake-quantization module: activations forward, errors backward (QPyTorch's Quantizer)."""

    def __init__(
        self,
        forward_fmt: BlockFloat,
        backward_fmt: BlockFloat,
        generator: torch.Generator | None = None,
        keep_codes: bool = False,
    ) -> None:
        super().__init__()
        self.forward_fmt = forward_fmt
        self.backward_fmt = backward_fmt
        self.generator = generator
        self.keep_codes = keep_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize ``x`` now and its gradient later."""
        return quantize_flow(
            x, self.forward_fmt, self.backward_fmt, self.generator, self.keep_codes
        )

    def extra_repr(self) -> str:
        return f"forward={self.forward_fmt.describe()}, backward={self.backward_fmt.describe()}"


class QuantizerHooks:
    """Handles of the forward hooks ``attach_quantizers`` installed; ``remove()`` undoes them."""

    def __init__(self, handles: Iterable[RemovableHandle], quantizer: Quantizer) -> None:
        self.handles = list(handles)
        self.quantizer = quantizer

    def remove(self) -> None:
        """Detach every quantizer, restoring the model's full-precision forward pass."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __len__(self) -> int:
        return len(self.handles)


def attach_quantizers(
    model: nn.Module,
    activation: BlockFloat,
    error: BlockFloat,
    generator: torch.Generator | None = None,
    keep_codes: bool = False,
    skip: Iterable[nn.Module] = (),
) -> QuantizerHooks:
    """Make ``model`` train with quantized activations and errors, without rewriting it.

    Forward hooks quantize the output of every conv/linear, activation and pooling module and the
    model's own output (as the reference code places its quantizers); the same points quantize
    the errors flowing back. Works on any ``nn.Module``, torchvision models included.
    ``keep_codes``: hand the integer codes to the layers ``attach_integer_arithmetic`` reroutes
    (the same values; it saves them re-deriving the codes). ``skip``: modules that quantize
    their own outputs with the returned ``quantizer`` (``compact_saved.attach_masked_relu``).
    """
    quantizer = Quantizer(activation, error, generator, keep_codes)

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return quantizer(output)
        return output

    targets = [m for m in model.modules() if isinstance(m, QUANTIZED_OUTPUT_TYPES)]
    if model not in targets:
        targets.append(model)
    skipped = {id(m) for m in skip}
    targets = [m for m in targets if id(m) not in skipped]
    return QuantizerHooks((m.register_forward_hook(hook) for m in targets), quantizer)
