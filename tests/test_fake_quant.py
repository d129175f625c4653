"""Fake quantization of activations (forward) and errors (backward) via attach_quantizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowprec_fl.models import ConvNet, resnet18_cifar
from quantization import FP32, BlockFloat, attach_quantizers, quantize
from quantization.fake_quant import QUANTIZED_OUTPUT_TYPES, quantize_flow
from tests.reference_bfp import reference_quantize

ACTIVATION = BlockFloat(8, layout="tensor", rounding="stochastic")
ERROR = BlockFloat(6, layout="tensor", rounding="stochastic")


def _on_grid(t: torch.Tensor, fmt: BlockFloat) -> bool:
    """Whether ``t`` is exactly representable in ``fmt`` (nearest re-quantization is a no-op)."""
    return torch.equal(quantize(t, BlockFloat(fmt.bits, fmt.layout, "nearest", fmt.block_size)), t)


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(in_channels=1, num_classes=10, width=16, depth=3)


def _inputs(shape=(4, 1, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _capture_output_grad(module: nn.Module, store: dict[str, torch.Tensor]) -> None:
    """Record d(loss)/d(module's raw output), i.e. the error that reaches the module's backward.

    Registered *before* ``attach_quantizers``, this hook sees the output before the quantizer
    hook replaces it, so the gradient it records is the one after error quantization.
    """

    def hook(_module, _inputs, output):
        output.register_hook(lambda grad: store.__setitem__("grad", grad.detach().clone()))

    module.register_forward_hook(hook)


def test_outputs_and_errors_are_on_their_grids():
    model = _convnet()
    conv = model.features[0]
    captured: dict[str, torch.Tensor] = {}
    _capture_output_grad(conv, captured)
    attach_quantizers(model, ACTIVATION, ERROR, torch.Generator().manual_seed(0))
    out = model(_inputs())
    assert _on_grid(out, ACTIVATION)
    assert not _on_grid(out, BlockFloat(5, layout="tensor"))  # 8 bits really used, not fewer
    out.square().sum().backward()
    error = captured["grad"]
    assert error.abs().max() > 0
    assert _on_grid(error, ERROR)
    assert error.unique().numel() <= 2**ERROR.bits
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_error_check_distinguishes_unquantized_errors():
    # Same capture with errors left in float32: the gradient is then off the 6-bit grid.
    model = _convnet()
    captured: dict[str, torch.Tensor] = {}
    _capture_output_grad(model.features[0], captured)
    attach_quantizers(model, ACTIVATION, FP32, torch.Generator().manual_seed(0))
    model(_inputs()).square().sum().backward()
    assert not _on_grid(captured["grad"], ERROR)
    assert captured["grad"].unique().numel() > 2**ERROR.bits


def test_errors_quantized_with_activations_in_full_precision():
    reference = _convnet()
    model = _convnet()
    captured: dict[str, torch.Tensor] = {}
    _capture_output_grad(model.features[0], captured)
    attach_quantizers(model, FP32, ERROR, torch.Generator().manual_seed(0))
    x = _inputs()
    out = model(x)
    assert torch.equal(out, reference(x))  # forward untouched
    out.square().sum().backward()
    assert _on_grid(captured["grad"], ERROR)


def test_hook_count_and_remove_restores_the_model():
    model = _convnet()
    expected = sum(isinstance(m, QUANTIZED_OUTPUT_TYPES) for m in model.modules())
    n_conv_linear_act_pool = sum(
        isinstance(m, nn.Conv2d | nn.Linear | nn.ReLU | nn.AvgPool2d) for m in model.modules()
    )
    assert expected == n_conv_linear_act_pool == 3 * 3 + 1
    x = _inputs()
    with torch.no_grad():
        plain = model(x)
        hooks = attach_quantizers(model, ACTIVATION, ERROR, torch.Generator().manual_seed(0))
        assert len(hooks) == n_conv_linear_act_pool + 1  # + the model's own output
        quantized = model(x)
        assert not torch.equal(quantized, plain)
        hooks.remove()
        assert len(hooks) == 0
        assert torch.equal(model(x), plain)
        assert not model._forward_hooks
        assert not any(m._forward_hooks for m in model.modules())


def test_seeded_generator_makes_training_reproducible():
    grads = []
    for _ in range(2):
        model = _convnet()
        attach_quantizers(model, ACTIVATION, ERROR, torch.Generator().manual_seed(3))
        model(_inputs()).square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_resnet18_forward_backward_on_grid():
    torch.manual_seed(0)
    model = resnet18_cifar(in_channels=3, num_classes=10)
    captured: dict[str, torch.Tensor] = {}
    _capture_output_grad(model.conv1, captured)
    hooks = attach_quantizers(model, ACTIVATION, ERROR, torch.Generator().manual_seed(0))
    assert len(hooks) == sum(isinstance(m, QUANTIZED_OUTPUT_TYPES) for m in model.modules()) + 1
    x = _inputs((2, 3, 32, 32))
    out = model(x)
    assert out.shape == (2, 10) and _on_grid(out, ACTIVATION)
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert _on_grid(captured["grad"], ERROR)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_full_precision_formats_have_no_effect():
    reference, model = _convnet(), _convnet()
    hooks = attach_quantizers(model, FP32, FP32, torch.Generator().manual_seed(0))
    assert len(hooks) == 11
    x = _inputs()
    out_ref, out = reference(x), model(x)
    assert torch.equal(out, out_ref)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, p_ref.grad)


def _blocks_of(t: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    flat = t.reshape(-1)
    return [flat[i : i + block_size] for i in range(0, flat.numel(), block_size)]


@pytest.mark.parametrize("bits", [4, 8])
def test_block_layout_activations_and_errors(bits):
    fmt = BlockFloat(bits, layout="block", block_size=32)
    error_fmt = BlockFloat(bits, layout="block", rounding="nearest", block_size=32)
    model = _convnet()
    conv = model.features[0]
    quantized: dict[str, torch.Tensor] = {}
    _capture_output_grad(conv, quantized)  # before the quantizer: the error it lets through
    attach_quantizers(model, fmt, error_fmt, torch.Generator().manual_seed(0))
    raw: dict[str, torch.Tensor] = {}
    _capture_output_grad(conv, raw)  # after it (sees its output): the error arriving at it
    out = model(_inputs())
    assert _on_grid(out, fmt)
    out.square().sum().backward()

    # The error is quantized block by block: each run of 32 elements is the formula's
    # quantization of that run on its own (the loop-over-blocks reference), with its own exponent.
    error, incoming = quantized["grad"], raw["grad"]
    assert incoming.abs().max() > 0 and not torch.equal(error, incoming)
    expected, exponents = reference_quantize(incoming, error_fmt)
    assert torch.equal(error, torch.from_numpy(expected).to(torch.float32))
    assert len(set(exponents.tolist())) > 1  # blocks really differ in exponent
    tensor_fmt = BlockFloat(bits, layout="tensor", rounding="nearest")
    assert not torch.equal(error, quantize(incoming, tensor_fmt))  # not one exponent per tensor
    for got, block in zip(_blocks_of(error, 32), _blocks_of(incoming, 32), strict=True):
        assert torch.equal(got, quantize(block, tensor_fmt))
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_block_layout_backward_with_stochastic_rounding(bits):
    fmt = BlockFloat(bits, layout="block", block_size=32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 70, generator=g).requires_grad_()
    upstream = torch.randn(3, 70, generator=g) * torch.logspace(-3, 1, 70)  # varied magnitudes
    flow = quantize_flow(x, fmt, fmt, torch.Generator().manual_seed(9))
    flow.backward(upstream)

    # The same generator, replayed: the forward draws its dither key first, then the backward.
    replay = torch.Generator().manual_seed(9)
    assert torch.equal(flow, quantize(x.detach(), fmt, replay))
    expected = quantize(upstream, fmt, replay)
    assert torch.equal(x.grad, expected)
    assert not torch.equal(x.grad, upstream)
    nearest = BlockFloat(bits, layout="tensor", rounding="nearest")
    for block in _blocks_of(x.grad, 32):  # each block of 32 on its own grid
        assert torch.equal(quantize(block, nearest), block)
    assert not _on_grid(x.grad, BlockFloat(bits, layout="tensor"))


def test_quantizer_keeps_channels_last_activations_and_errors_in_their_order():
    fmt = BlockFloat(8, layout="tensor")
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    stored = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = quantize_flow(stored, fmt, fmt, torch.Generator().manual_seed(1))
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))  # NCHW error
    assert stored.grad.is_contiguous(memory_format=torch.channels_last)
    plain = x.clone().requires_grad_()
    z = quantize_flow(plain, fmt, fmt, torch.Generator().manual_seed(1))
    z.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(y, z) and torch.equal(stored.grad, plain.grad)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_an_in_place_op_on_a_quantized_output_trains_like_its_out_of_place_twin(memory_format):
    # ``conv(x).relu_()``: autograd refuses in-place ops on a custom Function's output that is
    # a view, so the quantizer's output must not be one (it was, for contiguous tensors)
    class ConvReLU(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.in_place = nn.Conv2d(2, 4, 3), in_place

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.relu_() if self.in_place else y.relu()

    fmt = BlockFloat(8, layout="tensor")
    x = torch.randn(3, 2, 7, 7, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=memory_format)
    runs = []
    for in_place in (True, False):
        model = ConvReLU(in_place)
        attach_quantizers(model, fmt, fmt, torch.Generator().manual_seed(2))
        out = model(x)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        runs.append((out.detach(), model.conv.weight.grad, model.conv.bias.grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
