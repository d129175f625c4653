"""The block-floating-point quantizer against the formula, on both backends."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from quantization import (
    BlockFloat,
    _openmp,
    quantize,
    quantize_,
    quantize_codes,
    torch_backend,
)
from quantization.dither import dither_bits, draw_key
from quantization.quantizer import dequantize_codes, quantize_many_
from tests.reference_bfp import reference_quantize

LAYOUTS = [
    ("tensor", 32),
    ("channel", 32),
    ("kernel", 32),
    ("block", 32),
    ("block", 7),
    ("auto", 32),
]
BACKENDS = ["numba", "torch"]


def _run(backend: str, fn, *args, **kwargs):
    if backend == "torch":
        with torch_backend():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,block_size", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "up"])
def test_matches_reference_formula(backend, layout, block_size, bits, rounding):
    fmt = BlockFloat(bits, layout=layout, rounding=rounding, block_size=block_size)
    x = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(bits)) * 4
    x[1] = 0  # an all-zero channel / kernel
    hashes = dither_bits(x.numel(), draw_key(torch.Generator().manual_seed(7))).numpy()
    got = _run(backend, quantize, x, fmt, torch.Generator().manual_seed(7))
    want, _ = reference_quantize(x, fmt, hashes)
    assert torch.equal(got, torch.from_numpy(want).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_are_bit_identical(backend):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0))  # parallel kernel path
    for fmt in [BlockFloat(8), BlockFloat(4, layout="block"), BlockFloat(6, rounding="nearest")]:
        a = quantize(x, fmt, torch.Generator().manual_seed(3))
        b = _run(backend, quantize, x, fmt, torch.Generator().manual_seed(3))
        assert torch.equal(_bits_of(a), _bits_of(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_magnitudes_and_empty(backend):
    fmt = BlockFloat(8, layout="block", block_size=4, rounding="nearest")
    x = torch.tensor([1e-45, 2e-44, 0.0, -1e-40, 3e38, -1e38, 1.0, 0.5, 0, 0, 0, 0])
    got = _run(backend, quantize, x, fmt)
    want, exps = reference_quantize(x, fmt)
    assert torch.equal(got, torch.from_numpy(want).float())
    assert exps.tolist() == [-128, 127, -128]
    _, e = _run(backend, quantize_codes, x, fmt)
    assert e.tolist() == [-128, 127, -128] and e.dtype == torch.int8
    assert torch.equal(_run(backend, quantize, torch.empty(0, 3), fmt), torch.empty(0, 3))


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8])
def test_backends_agree_on_signed_zeros_powers_of_two_and_subnormals(block_size):
    """Shared exponents where the largest magnitude is a negative power of two, -0.0, a
    subnormal or near the float32 limit: the numba kernel's sign-split maxima against torch's
    per-element keys."""
    specials = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, -2.0, 2.0, -0.5, -4.0, 1.5, -1.5, 1e-45, -1e-45, 0.75, -3.0]
    )
    extremes = torch.tensor([2.0**-126, 3e38, 2.0**-149, 2.0**127, 2.0**-130])
    specials = torch.cat([specials, extremes, -extremes])
    generator = torch.Generator().manual_seed(block_size)
    fmt = BlockFloat(4, layout="block", block_size=block_size, rounding="nearest")
    for _ in range(50):
        x = specials[torch.randint(len(specials), (40,), generator=generator)]
        codes, exps = quantize_codes(x, fmt)
        with torch_backend():
            want_codes, want_exps = quantize_codes(x, fmt)
        assert torch.equal(exps, want_exps) and torch.equal(codes, want_codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(backend, bad):
    x = torch.ones(100)
    x[17] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        _run(backend, quantize, x, BlockFloat(8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "up"])
def test_idempotent_on_the_grid(backend, rounding):
    fmt = BlockFloat(4, layout="block", block_size=16, rounding=rounding)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    once = _run(backend, quantize, x, fmt, torch.Generator().manual_seed(1))
    assert (once == once.min()).any()  # blocks whose largest magnitude is a -2^k code occur
    twice = _run(backend, quantize, once, fmt, torch.Generator().manual_seed(2))
    assert torch.equal(once, twice)


def test_codes_decode_to_fake_quantized_values_bit_for_bit():
    x = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0)) * 1e-3
    x[0, 0] = -0.0
    for bits in range(2, 17):
        fmt = BlockFloat(bits, layout="auto")
        values = quantize(x, fmt, torch.Generator().manual_seed(bits))
        codes, exps = quantize_codes(x, fmt, torch.Generator().manual_seed(bits))
        assert codes.dtype == (torch.int8 if bits <= 8 else torch.int16)
        assert int(codes.min()) >= fmt.code_min and int(codes.max()) <= fmt.code_max
        assert torch.equal(_bits_of(values), _bits_of(dequantize_codes(codes, exps, fmt)))


def test_same_seed_same_result_different_seed_different():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    fmt = BlockFloat(4)
    a = quantize(x, fmt, torch.Generator().manual_seed(5))
    b = quantize(x, fmt, torch.Generator().manual_seed(5))
    c = quantize(x, fmt, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = quantize(x, fmt)
    torch.manual_seed(9)
    assert torch.equal(d, quantize(x, fmt))  # the default generator is seedable too


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "fmt",
    [
        BlockFloat(8),  # one block: the chunks split it and merge partial maxima
        BlockFloat(6, layout="block"),  # 32-element blocks: whole blocks per chunk
        BlockFloat(4, layout="channel", rounding="nearest"),  # blocks longer than a chunk
        BlockFloat(12, layout="block", block_size=1000),  # int16 codes, odd block length
    ],
)
def test_thread_count_does_not_change_results(fmt, torch_threads, monkeypatch):
    x = torch.randn(7, 100_003, generator=torch.Generator().manual_seed(0))
    runs = []
    torch_threads(1)
    one = quantize_codes(x, fmt, torch.Generator().manual_seed(1))
    torch_threads(2)
    parallel = _openmp.openmp_parallel()
    if sys.platform == "linux" and not os.environ.get("LOWPREC_SERIAL_KERNELS"):
        assert parallel is not None  # torch's OpenMP runtime is found there: the test uses it
    if parallel is not None:
        monkeypatch.setattr(
            _openmp, "openmp_parallel", lambda: lambda *a: runs.append(a) or parallel(*a)
        )
    two = quantize_codes(x, fmt, torch.Generator().manual_seed(1))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert parallel is None or [threads for *_, threads in runs] == [2, 2]  # both passes


def test_parallel_pass_still_finds_nan(torch_threads):
    torch_threads(2)
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[-3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, BlockFloat(8))


def test_nearest_error_is_at_most_half_a_step():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    fmt = BlockFloat(8, rounding="nearest")
    step = 2.0 ** (int(np.floor(np.log2(float(x.abs().max())))) - 6)
    assert (quantize(x, fmt) - x).abs().max() <= step / 2


def test_non_float32_inputs_keep_their_dtype():
    x = torch.randn(100, dtype=torch.float64)
    assert quantize(x, BlockFloat(8)).dtype == torch.float64
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, dtype=torch.int32), BlockFloat(8))


def test_full_precision_is_identity():
    x = torch.randn(10)
    assert quantize(x, BlockFloat(32)) is x
    with pytest.raises(ValueError, match="32-bit"):
        quantize_codes(x, BlockFloat(32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [100, 300_000])  # the serial and the parallel kernel path
def test_in_place_quantize_matches_out_of_place(backend, size, torch_threads):
    torch_threads(2)
    fmt = BlockFloat(6, layout="block")
    x = torch.randn(3, size, generator=torch.Generator().manual_seed(0))
    want = _run(backend, quantize, x, fmt, torch.Generator().manual_seed(4))
    inplace = x.clone()
    assert _run(backend, quantize_, inplace, fmt, torch.Generator().manual_seed(4)) is inplace
    assert torch.equal(_bits_of(inplace), _bits_of(want))
    strided = x.clone().t()  # not contiguous: quantized through a copy, written back
    want_strided = _run(
        backend, quantize, strided.contiguous(), fmt, torch.Generator().manual_seed(5)
    )
    _run(backend, quantize_, strided, fmt, torch.Generator().manual_seed(5))
    assert torch.equal(_bits_of(strided), _bits_of(want_strided))
    bad = x.clone()
    bad[1, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        _run(backend, quantize_, bad, fmt)
    assert torch.equal(bad[0], x[0])  # a refused tensor is left as it was


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_negative_values_round_up_to_zero(backend):
    # v - floor(v) rounds to exactly 1.0 in float32: the threshold must stay in uint32 range
    # (an out-of-range conversion is undefined and differed on non-AVX-512 code) and round up.
    x = torch.full((9_999,), -1e-30)
    x[0] = 1.0
    codes, _ = _run(backend, quantize_codes, x, BlockFloat(8), torch.Generator().manual_seed(0))
    assert set(codes[1:].tolist()) == {0}


def test_in_place_quantize_is_seen_by_autograd():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([0.3, 0.7])
    loss = (w * x).sum()  # saves x for the backward pass
    quantize_(x, BlockFloat(4, rounding="nearest"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("shape", [(32, 16, 9, 11), (3, 5, 7, 9), (1, 3, 1, 5), (2, 7, 1, 1)])
def test_channels_last_tensors_quantize_to_the_same_values_and_stay_channels_last(
    bits, rounding, shape, torch_threads
):
    torch_threads(2)  # the kernel's chunks then split channel rows
    fmt = BlockFloat(bits, layout="tensor", rounding=rounding)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    stored = x.contiguous(memory_format=torch.channels_last)
    values = quantize(stored, fmt, torch.Generator().manual_seed(1))
    codes, exps = quantize_codes(stored, fmt, torch.Generator().manual_seed(1))
    assert torch.equal(values, quantize(x, fmt, torch.Generator().manual_seed(1)))
    want_codes, want_exps = quantize_codes(x, fmt, torch.Generator().manual_seed(1))
    assert torch.equal(codes, want_codes) and torch.equal(exps, want_exps)
    in_place = quantize_(stored.clone(), fmt, torch.Generator().manual_seed(1))
    assert torch.equal(in_place, values)
    for t in (values, codes, in_place):
        assert t.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_tensors_with_several_blocks_are_quantized_in_logical_order():
    fmt = BlockFloat(8, layout="block", block_size=32)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    stored = x.contiguous(memory_format=torch.channels_last)
    got = quantize(stored, fmt, torch.Generator().manual_seed(1))
    assert torch.equal(got, quantize(x, fmt, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "fmt",
    [
        BlockFloat(8, "block", block_size=32),
        BlockFloat(8, "channel"),
        BlockFloat(6, "tensor"),  # blocks longer than a chunk: partial maxima merged
        BlockFloat(4, "auto", "nearest"),
        BlockFloat(12, "block", block_size=1000),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_many_tensors_in_one_call_equal_one_call_each(fmt, threads, torch_threads):
    torch_threads(threads)
    shapes = [(16, 1, 3, 3), (16,), (5,), (7, 100_003), (0,), (1,), (10, 33)]
    tensors = [
        torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)
    ]
    one_by_one = [t.clone() for t in tensors]
    together = [t.clone() for t in tensors]
    generator, generator_many = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in one_by_one:
        quantize_(t, fmt, generator)
    quantize_many_(together, fmt, generator_many)
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, together, strict=True))
    # the generator advanced alike: the next draw matches
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=generator_many))


def test_many_tensors_with_a_nan_raise_and_write_nothing():
    tensors = [torch.randn(100), torch.randn(50)]
    tensors[1][7] = float("nan")
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_many_(tensors, BlockFloat(8))
    assert torch.equal(tensors[0], before[0])


def test_many_tensors_not_all_contiguous_are_quantized_one_by_one_alike():
    fmt = BlockFloat(8, "tensor")
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    mixed = [base.t(), torch.randn(5, generator=torch.Generator().manual_seed(1))]
    want = [t.clone() for t in mixed]
    generator = torch.Generator().manual_seed(2)
    for t in want:
        quantize_(t, fmt, generator)
    quantize_many_(mixed, fmt, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(mixed, want, strict=True))
