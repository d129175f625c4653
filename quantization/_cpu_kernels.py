"""Fused CPU kernel (numba) for block floating point; the same arithmetic as the torch path.

One call does everything: a pass finds each block's largest magnitude (on the float bits, so
NaN/inf are caught for free), then per-block exponents and power-of-two steps, then one pass
scales, dithers, rounds, clamps and writes. ``torch.rand`` alone would cost more.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_U32 = np.uint32
_INV_2_POW_32 = 2.0**-32
_FLOAT_EXPONENT_ALL_ONES = 0x7F800000
ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_UP = 0, 1, 2

# Loops index slices from 0 (``for j in range(seg.size)``): numba then drops its negative-index
# wraparound check and LLVM vectorizes them; indexing ``x[i]`` from a computed start does not.


@njit(inline="always")
def _mix32(h):
    h = _U32(h ^ (h >> _U32(16)))
    h = _U32(h * _U32(0x21F0AAAD))
    h = _U32(h ^ (h >> _U32(15)))
    h = _U32(h * _U32(0x735A2D97))
    return _U32(h ^ (h >> _U32(15)))


@njit(inline="always")
def _segment_key_max(bits):
    """Max over a slice of float bits of |x|, one less for negative powers of two."""
    m = np.int32(0)
    for j in range(bits.size):
        v = bits[j]
        mag = v & np.int32(0x7FFFFFFF)
        biased = mag >> np.int32(23)
        negative_power_of_two = (v < 0) & ((v & np.int32(0x7FFFFF)) == 0)
        m = max(m, mag - np.int32(negative_power_of_two & (biased != 0) & (biased != 255)))
    return m


@njit(inline="always")
def _exponent_of_key(key):
    """floor(log2(value)) of a positive float's bits, clamped below at -128 (-128 for zero)."""
    biased = key >> 23
    if biased > 0:
        return biased - 127
    return -127 if key >= (1 << 22) else -128


@njit(inline="always")
def _round_segment(xs, outs, first, s_in, s_out, lo, hi, mode, k1, k2):
    """Round one slice that lies inside one block; ``first`` is its flat index (dither counter)."""
    if mode == ROUND_STOCHASTIC:
        for j in range(xs.size):
            h = _mix32(_mix32(_U32(first + j) ^ k1) ^ k2)
            v = np.floor(np.float64(xs[j]) * s_in + np.float64(h) * _INV_2_POW_32)
            outs[j] = (min(max(v, lo), hi) + 0.0) * s_out
    elif mode == ROUND_UP:
        for j in range(xs.size):
            v = np.ceil(np.float64(xs[j]) * s_in)
            outs[j] = (min(max(v, lo), hi) + 0.0) * s_out
    else:
        for j in range(xs.size):
            v = np.rint(np.float64(xs[j]) * s_in)
            outs[j] = (min(max(v, lo), hi) + 0.0) * s_out


def _quantize_flat(bits, x, block_len, nbits, mode, k1, k2, codes_only, out, exps):
    """Quantize flat float32 ``x`` (``bits`` is its int32 view) in blocks of ``block_len``.

    Writes codes (``codes_only``) or float32 values to ``out`` and exponents to ``exps``.
    Returns False, writing nothing to ``out``, if ``x`` holds NaN or inf.
    """
    n = x.size
    nblocks = exps.size
    keys = np.zeros(nblocks, dtype=np.int32)
    for b in range(nblocks):
        keys[b] = _segment_key_max(bits[b * block_len : min(n, (b + 1) * block_len)])
    if nblocks > 0 and keys.max() >= _FLOAT_EXPONENT_ALL_ONES:
        return False
    lo = -float(1 << (nbits - 1))
    hi = float((1 << (nbits - 1)) - 1)
    for b in range(nblocks):
        e = _exponent_of_key(keys[b])
        exps[b] = e
        s_in = math.ldexp(1.0, nbits - 2 - e)
        s_out = 1.0 if codes_only else math.ldexp(1.0, e - nbits + 2)
        i0, i1 = b * block_len, min(n, (b + 1) * block_len)
        _round_segment(x[i0:i1], out[i0:i1], i0, s_in, s_out, lo, hi, mode, k1, k2)
    return True


# Serial on purpose: numba's thread pools (omp, workqueue) fight torch's OpenMP pool for the
# same cores; measured 10-35x slower training steps on 2 cores. One pass is memory-bound anyway.
_quantize_kernel = njit(cache=True, nogil=True)(_quantize_flat)


def quantize_flat(
    x: np.ndarray,
    block_len: int,
    bits: int,
    mode: int,
    key: tuple[int, int],
    codes_only: bool,
    out: np.ndarray,
    exps: np.ndarray,
) -> bool:
    """Block-quantize contiguous float32 ``x`` into ``out`` and ``exps``; False on NaN/inf."""
    return _quantize_kernel(
        x.view(np.int32),
        x,
        block_len,
        bits,
        mode,
        np.uint64(key[0]),
        np.uint64(key[1]),
        codes_only,
        out,
        exps,
    )
