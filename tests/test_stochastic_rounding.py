"""Stochastic rounding is unbiased and its counter-based dither is uniform and independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantization import BlockFloat, block_exponents, quantize, torch_backend
from quantization.dither import uniform_dither


def test_dither_is_uniform_and_uncorrelated():
    u = uniform_dither(1_000_000, key=0x1234_5678_9ABC).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    counts, _ = np.histogram(u, bins=100, range=(0, 1))
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum()
    assert chi2 < 99 + 5 * np.sqrt(2 * 99)  # ~5 sigma for 99 degrees of freedom
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(u.size)
    v = uniform_dither(1_000_000, key=0x1234_5678_9ABD).numpy()  # neighbouring key
    assert abs(np.corrcoef(u, v)[0, 1]) < 5 / np.sqrt(u.size)


def test_one_key_never_repeats_a_dither_value():
    u = uniform_dither(1 << 20, key=42)
    assert torch.unique(u).numel() == u.numel()


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.25, 0.5, 0.77, 0.999])
def test_stochastic_rounding_is_unbiased(backend, fraction):
    # One block whose max pins the grid to integer steps (8 bits, e = 6 -> step 1).
    n = 400_000
    x = torch.full((n,), 3.0 + fraction)
    x[0] = 100.0
    fmt = BlockFloat(8, layout="tensor", rounding="stochastic")
    if backend == "torch":
        with torch_backend():
            q = quantize(x, fmt, torch.Generator().manual_seed(0))
    else:
        q = quantize(x, fmt, torch.Generator().manual_seed(0))
    rest = q[1:].double()
    assert set(rest.unique().tolist()) <= {3.0, 4.0}
    sigma = np.sqrt(fraction * (1 - fraction) / (n - 1))
    assert abs(rest.mean().item() - (3.0 + fraction)) < 5 * sigma + 1e-9


def test_unbiased_on_random_data_across_calls():
    # E[Q(x)] = x elementwise: average 400 independent quantizations of the same tensor. Only
    # values inside the code range count: the top interval (code_max, 2^(b-1)) clamps by design.
    x = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    fmt = BlockFloat(4, layout="block", block_size=32)
    g = torch.Generator().manual_seed(1)
    calls = 400
    mean = torch.stack([quantize(x, fmt, g) for _ in range(calls)]).double().mean(0)
    step = torch.exp2(block_exponents(x, fmt).double() - 2)
    scaled, err = (
        x.double() / step.repeat_interleave(32),
        (mean - x.double()) / step.repeat_interleave(32),
    )
    inside = scaled.abs() <= fmt.code_max
    assert inside.float().mean() > 0.9
    assert abs(err[inside].mean().item()) < 5 * 0.5 / np.sqrt(calls * int(inside.sum()))
    assert err[inside].abs().max().item() < 5.5 * 0.5 / np.sqrt(calls)


@pytest.mark.parametrize("count", [0, 1, 14, 300])
def test_keys_drawn_together_are_the_keys_drawn_one_by_one(count):
    from quantization.dither import draw_key, draw_keys

    together, apart = torch.Generator().manual_seed(count), torch.Generator().manual_seed(count)
    assert draw_keys(count, together) == [draw_key(apart) for _ in range(count)]
    assert torch.equal(torch.rand(3, generator=together), torch.rand(3, generator=apart))
