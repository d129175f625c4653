"""Fused CPU kernel (numba) for block floating point; the same arithmetic as the torch path.

One call does everything: a parallel pass finds each block's largest magnitude (on the float
bits, so NaN/inf are caught for free), then per-block exponents and power-of-two steps, then one
parallel pass scales, dithers, rounds, clamps and writes. ``torch.rand`` alone would cost more.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import njit, prange

_M32 = np.uint64(0xFFFFFFFF)
_MUL1 = np.uint64(0x21F0AAAD)
_MUL2 = np.uint64(0x735A2D97)
_S15 = np.uint64(15)
_S16 = np.uint64(16)
_INV_2_POW_32 = 2.0**-32
_CHUNK = 16384
_FLOAT_EXPONENT_ALL_ONES = 0x7F800000
PARALLEL_MIN_ELEMENTS = 1 << 16
ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_UP = 0, 1, 2


@njit(inline="always")
def _mix32(h):
    h = h ^ (h >> _S16)
    h = (h * _MUL1) & _M32
    h = h ^ (h >> _S15)
    h = (h * _MUL2) & _M32
    return h ^ (h >> _S15)


@njit(inline="always")
def _magnitude_key(v):
    """Bits of |x|, minus one for a negative power of two (which -2^(b-1) codes represent)."""
    mag = v & 0x7FFFFFFF
    if v < 0 and (v & 0x7FFFFF) == 0 and mag != 0 and mag < _FLOAT_EXPONENT_ALL_ONES:
        return mag - 1
    return mag


@njit(inline="always")
def _exponent_of_key(key):
    """floor(log2(value)) of a positive float's bits, clamped below at -128 (-128 for zero)."""
    biased = key >> 23
    if biased > 0:
        return biased - 127
    return -127 if key >= (1 << 22) else -128


def _quantize_flat(bits, x, block_len, nbits, mode, k1, k2, codes_only, out, exps):
    """Quantize flat float32 ``x`` (``bits`` is its int32 view) in blocks of ``block_len``.

    Writes codes (``codes_only``) or float32 values to ``out`` and exponents to ``exps``.
    Returns False, writing nothing to ``out``, if ``x`` holds NaN or inf.
    """
    n = x.size
    nblocks = exps.size
    keys = np.zeros(nblocks, dtype=np.int32)
    if nblocks >= 8:
        for b in prange(nblocks):
            m = 0
            for i in range(b * block_len, min(n, (b + 1) * block_len)):
                m = max(m, _magnitude_key(bits[i]))
            keys[b] = m
    else:  # few long blocks: reduce chunks in parallel, then combine
        nchunks = (n + _CHUNK - 1) // _CHUNK
        partial = np.zeros(nchunks, dtype=np.int32)
        for c in prange(nchunks):
            m = 0
            for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
                m = max(m, _magnitude_key(bits[i]))
            partial[c] = m
        for c in range(nchunks):
            first = (c * _CHUNK) // block_len
            last = (min(n, (c + 1) * _CHUNK) - 1) // block_len
            if first == last:
                keys[first] = max(keys[first], partial[c])
            else:  # the chunk straddles blocks
                for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
                    keys[i // block_len] = max(keys[i // block_len], _magnitude_key(bits[i]))
    if nblocks > 0 and keys.max() >= _FLOAT_EXPONENT_ALL_ONES:
        return False
    inv_step = np.empty(nblocks, dtype=np.float64)
    out_step = np.empty(nblocks, dtype=np.float64)
    for b in prange(nblocks):
        e = _exponent_of_key(keys[b])
        exps[b] = e
        inv_step[b] = math.ldexp(1.0, nbits - 2 - e)
        out_step[b] = 1.0 if codes_only else math.ldexp(1.0, e - nbits + 2)
    lo = -float(1 << (nbits - 1))
    hi = float((1 << (nbits - 1)) - 1)
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(nchunks):
        start = c * _CHUNK
        end = min(n, start + _CHUNK)
        for b in range(start // block_len, (end - 1) // block_len + 1):
            i0 = max(start, b * block_len)
            i1 = min(end, (b + 1) * block_len)
            s_in = inv_step[b]
            s_out = out_step[b]
            if mode == ROUND_STOCHASTIC:
                for i in range(i0, i1):
                    h = _mix32(_mix32((np.uint64(i) ^ k1) & _M32) ^ k2)
                    v = np.floor(np.float64(x[i]) * s_in + np.float64(h) * _INV_2_POW_32)
                    out[i] = (min(max(v, lo), hi) + 0.0) * s_out
            elif mode == ROUND_UP:
                for i in range(i0, i1):
                    v = np.ceil(np.float64(x[i]) * s_in)
                    out[i] = (min(max(v, lo), hi) + 0.0) * s_out
            else:
                for i in range(i0, i1):
                    v = np.rint(np.float64(x[i]) * s_in)
                    out[i] = (min(max(v, lo), hi) + 0.0) * s_out
    return True


def _compiled(fn, parallel: bool):
    """A numba-compiled copy of ``fn``; copies get distinct names so their disk caches differ."""
    variant = "parallel" if parallel else "serial"
    copy = types.FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_{variant}")
    copy.__qualname__ = copy.__name__
    return njit(parallel=parallel, cache=True)(copy)


_quantize_parallel = _compiled(_quantize_flat, parallel=True)
_quantize_serial = _compiled(_quantize_flat, parallel=False)


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
    kernel = _quantize_parallel if x.size >= PARALLEL_MIN_ELEMENTS else _quantize_serial
    return kernel(
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
