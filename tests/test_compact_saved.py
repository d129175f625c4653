"""What backward needs, kept compact: int8 codes for grid tensors, bool masks for ReLU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantization import BlockFloat, attach_quantizers
from quantization.compact_saved import (
    attach_masked_relu,
    pack_saved,
    saved_as_codes,
    unpack_saved,
)
from quantization.grid_codes import quantize_with_codes


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


def test_masked_relu_saves_one_byte_an_element():
    stored: list[torch.Tensor] = []
    relu = nn.ReLU()
    attach_masked_relu(relu)
    x = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
        relu(x).sum().backward()
    assert [(t.dtype, t.numel()) for t in stored] == [(torch.bool, 1000)]
    assert torch.equal(x.grad, (x > 0).float())


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
