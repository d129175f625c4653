"""What backward needs, kept compact: int8 codes for grid tensors, bool masks for ReLU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantization import BlockFloat, Quantizer, attach_quantizers, quantize
from quantization._saved_kernels import positive_bits, zero_where_clear_
from quantization.compact_saved import (
    attach_masked_relu,
    attach_shape_only_pooling,
    pack_saved,
    relus_of,
    saved_as_codes,
    unpack_saved,
)
from quantization.grid_codes import attached_codes, quantize_with_codes


def test_masked_relu_has_relus_values_and_gradients_and_detaches():
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    x[0, :] = 0.0  # exact zeros before and after the ReLU
    grads = []
    for masked in (False, True):
        torch.manual_seed(1)
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        attached = attach_masked_relu(model) if masked else None
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
        if attached is not None:
            assert len(attached) == 1
            attached.remove()
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))
    assert "forward" not in vars(model[1])


def test_masked_relu_saves_one_bit_an_element():
    stored: list[torch.Tensor] = []
    relu = nn.ReLU()
    attach_masked_relu(relu)
    x = torch.randn(1003, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
        relu(x).sum().backward()
    assert [(t.dtype, t.numel()) for t in stored] == [(torch.uint8, 126)]  # ceil(1003 / 8)
    assert torch.equal(x.grad, (x > 0).float())


@pytest.mark.parametrize("size", [1, 7, 8, 9, 64, 1003])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bit_masks_give_relus_own_backward_bit_for_bit(size, channels_last):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(2, 3, size, 1, generator=generator)
    x[0, 0, 0, 0], grad = 0.0, torch.randn(x.shape, generator=generator)
    grad[0, 1, 0, 0] = -0.0
    if channels_last:  # the mask follows memory order; both tensors are stored alike
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    out = torch.relu(x)
    want = torch.ops.aten.threshold_backward(grad, out, 0)
    got = zero_where_clear_(grad.clone(memory_format=torch.preserve_format), positive_bits(out))
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())  # +0.0 only
    with pytest.raises(ValueError, match="cannot mask"):
        zero_where_clear_(grad.clone(), positive_bits(out)[:-1])


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_grid_tensors_are_kept_as_codes_and_unpack_bit_for_bit(bits):
    fmt = BlockFloat(bits, layout="tensor")
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(bits))
    values = quantize_with_codes(x.contiguous(memory_format=torch.channels_last), fmt)
    packed = pack_saved(values)
    assert not isinstance(packed, torch.Tensor) and packed.codes.dtype == torch.int8
    unpacked = unpack_saved(packed)
    assert torch.equal(unpacked, values)
    assert unpacked.is_contiguous(memory_format=torch.channels_last)
    plain = torch.randn(3)  # no codes: kept as it is
    assert pack_saved(plain) is plain
    values.add_(0.0)  # changed since: its codes no longer count
    assert pack_saved(values) is values


def _model_run(compact: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))  # fmt: skip
    fmt = BlockFloat(8, layout="tensor")
    attach_quantizers(model, fmt, fmt, torch.Generator().manual_seed(1), keep_codes=True)
    if compact:
        attach_masked_relu(model)
    saved_bytes = []

    def pack(t):
        packed = pack_saved(t) if compact else t
        stored = packed if isinstance(packed, torch.Tensor) else packed.codes
        saved_bytes.append(stored.nbytes)
        return packed

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack_saved if compact else (lambda t: t)):
        out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters()], sum(saved_bytes)


def test_a_model_saving_codes_and_masks_trains_the_same_on_less_memory():
    out, grads, compact_bytes = _model_run(compact=True)
    want_out, want_grads, full_bytes = _model_run(compact=False)
    assert torch.equal(out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    assert compact_bytes < 0.5 * full_bytes, (compact_bytes, full_bytes)


def test_saved_as_codes_is_a_context_for_the_forward_pass():
    fmt = BlockFloat(8, layout="tensor")
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with saved_as_codes():
        y = norm(quantize_with_codes(x.detach(), fmt).requires_grad_())
    y.sum().backward()  # unpacks through the hooks saved with the tensors
    assert norm.weight.grad is not None


def _relu_block_run(fused: bool, channels_last: bool, in_place: bool):
    """conv -> ReLU -> conv with 8-bit activations and stochastically rounded 6-bit errors:
    the quantizer either hooked on the ReLU or fused into it."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=in_place),
                          nn.Conv2d(6, 4, 3))  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    activation, error = BlockFloat(8, layout="tensor"), BlockFloat(6, layout="tensor")
    skip = relus_of(model) if fused else ()
    hooks = attach_quantizers(model, activation, error, generator, keep_codes=True, skip=skip)
    rerouted = attach_masked_relu(model, hooks.quantizer if fused else None)
    x = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(6))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    hooked = len(hooks)
    hooks.remove()
    rerouted.remove()
    return out.detach(), [p.grad for p in model.parameters()], hooked


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_relu_with_its_quantizer_fused_in_trains_bit_for_bit_the_same(channels_last, in_place):
    out, grads, fused_hooks = _relu_block_run(True, channels_last, in_place)
    want_out, want_grads, hooks = _relu_block_run(False, channels_last, in_place)
    assert torch.equal(out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    assert fused_hooks == hooks - 1  # the ReLU quantizes its own output


def test_a_fused_relus_output_gets_its_codes_only_when_asked():
    fmt = BlockFloat(8, layout="tensor")
    quantizer = Quantizer(fmt, fmt, keep_codes=True)
    relu = nn.ReLU()
    attach_masked_relu(relu, quantizer)
    out = relu(torch.randn(4, 5, requires_grad=True))
    assert out._lowprec_grid_codes.codes is None  # none yet
    codes, step = attached_codes(out)
    assert codes.dtype == torch.int8 and torch.equal(codes.float() * step, out.detach())
    assert attached_codes(out)[0] is codes  # derived once
    assert torch.equal(out.detach(), quantize(torch.relu(out.detach()), fmt))  # on its grid


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d((2, 3), divisor_override=5),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_average_pooling_keeps_only_a_shape_and_has_the_same_gradient(pool, channels_last):
    x = torch.randn(3, 4, 9, 11, generator=torch.Generator().manual_seed(8))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_seed = torch.Generator().manual_seed(9)
    results, saved = [], {False: [], True: []}
    for shape_only in (False, True):
        rerouted = attach_shape_only_pooling(pool) if shape_only else None
        leaf = x.clone().requires_grad_()
        keep = saved[shape_only].append
        with torch.autograd.graph.saved_tensors_hooks(lambda t, k=keep: k(t) or t, lambda t: t):
            out = pool(leaf)
        out.backward(torch.randn(out.shape, generator=grad_seed.manual_seed(9)))
        results.append((out.detach(), leaf.grad))
        if rerouted is not None:
            assert len(rerouted) == 1
            rerouted.remove()
    # native pooling saved its whole input; the reroute saves no tensor
    assert [t.shape for t in saved[False]] == [x.shape] and saved[True] == []
    (want_out, want_grad), (out, grad) = results
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    assert grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert "forward" not in vars(pool)
