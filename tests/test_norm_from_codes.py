"""GroupNorm that saves its input's int8 codes and decodes them a slice at a time in backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantization import BlockFloat, quantize_flow
from quantization.norm_from_codes import attach_group_norm_from_codes


def _norm_run(from_codes: bool, x: torch.Tensor, affine: bool, monkeypatch=None):
    torch.manual_seed(10)
    norm = nn.GroupNorm(3, x.shape[1], affine=affine)
    if affine:  # weights away from their initial ones and zeros
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    rerouted = attach_group_norm_from_codes(norm) if from_codes else None
    leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
    # 8-bit values carrying their codes; the error flows back unquantized
    values = quantize_flow(leaf, BlockFloat(8, layout="tensor"), BlockFloat(32), keep_codes=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(values)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(11)))
    if rerouted is not None:
        rerouted.remove()
    params = [p.grad for p in norm.parameters()]
    return out.detach(), leaf.grad, params, saved, norm


@pytest.mark.parametrize("shape", [(7, 6, 5, 3), (1, 9, 4, 4), (5, 6, 11)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("slice_bytes", [1, 1 << 18])
def test_group_norm_from_codes_has_atens_input_gradient_bit_for_bit(
    shape, affine, slice_bytes, monkeypatch
):
    monkeypatch.setattr("quantization.norm_from_codes.SLICE_BYTES", slice_bytes)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    out, grad, params, saved, norm = _norm_run(True, x, affine)
    want_out, want_grad, want_params, _, _ = _norm_run(False, x, affine)
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    for got, want in zip(params, want_params, strict=True):  # summed in float64, slice by slice
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # what backward keeps of the input is its int8 codes, no float32 copy of it
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [torch.int8]
    assert "forward" not in vars(norm)


def test_group_norm_from_codes_keeps_a_channels_last_input_channels_last():
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(12))
    x = x.contiguous(memory_format=torch.channels_last)
    out, grad, *_ = _norm_run(True, x, affine=True)
    want_out, want_grad, *_ = _norm_run(False, x, affine=True)
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_an_input_without_codes_takes_the_plain_group_norm():
    norm = nn.GroupNorm(2, 4)
    rerouted = attach_group_norm_from_codes(norm)
    x = torch.randn(3, 4, 5, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(x)
    assert torch.equal(out, nn.functional.group_norm(x, 2, norm.weight, norm.bias))
    assert any(t is x for t in saved)  # ATen's own GroupNorm, saving its float32 input
    assert len(rerouted) == 1
