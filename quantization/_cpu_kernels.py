"""Fused CPU kernel (numba) for block floating point; the same arithmetic as the torch path.

One call does everything: a pass finds each block's largest magnitude (on the float bits, so
NaN/inf are caught for free), then per block the exponent and power-of-two scales, and one pass
that scales, dithers, rounds, clamps and writes. All element arithmetic is float32 and uint32
(16 lanes per AVX-512 vector) and exact: scaling by powers of two, ``floor``, ``v - floor(v)``.

Stochastic rounding adds one with probability ``floor(frac * 2^32) / 2^32`` (``frac = v -
floor(v)``), by comparing the 32-bit counter hash ``h`` (see ``dither.py``) with that integer:
unbiased to within 2^-32 of a step.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

_U32 = np.uint32
_F32 = np.float32
_TWO_POW_32 = _F32(4294967296.0)
_FLOAT_EXPONENT_ALL_ONES = 0x7F800000
ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_UP = 0, 1, 2

# Loops index slices from 0 (``for j in range(seg.size)``): numba then drops its negative-index
# wraparound check and LLVM vectorizes them; indexing ``x[i]`` from a computed start does not.


@intrinsic
def _mul32(typingctx, a, b):
    """uint32 * uint32 mod 2^32 as one 32-bit multiply (numba would widen it to 64 bits)."""
    sig = types.uint32(types.uint32, types.uint32)

    def codegen(context, builder, signature, args):
        return builder.mul(args[0], args[1])

    return sig, codegen


@intrinsic
def _xorshift32(typingctx, a, s):
    """``a ^ (a >> s)`` on uint32 without widening."""
    sig = types.uint32(types.uint32, types.uint32)

    def codegen(context, builder, signature, args):
        return builder.xor(args[0], builder.lshr(args[0], args[1]))

    return sig, codegen


@njit(inline="always")
def _mix32(h):
    h = _mul32(_xorshift32(h, _U32(16)), _U32(0x21F0AAAD))
    h = _mul32(_xorshift32(h, _U32(15)), _U32(0x735A2D97))
    return _xorshift32(h, _U32(15))


@njit(inline="always")
def _segment_key_max(bits):
    """Max over a slice of float bits of |x|, one less when that max is a negative power of two.

    Two plain reductions vectorize where a per-element key does not: as signed int32 the float
    bits' maximum is the largest positive value, as uint32 the largest-magnitude negative one.
    Among negatives the key (magnitude, minus one for a power of two) never decreases with the
    magnitude, so the largest-magnitude negative has the largest negative key.
    """
    signed_max = np.int32(0)
    unsigned_max = _U32(0)
    for j in range(bits.size):
        signed_max = max(signed_max, bits[j])
        unsigned_max = max(unsigned_max, _U32(bits[j]))
    key = signed_max  # +0.0 when no element is positive
    if unsigned_max >= _U32(0x80000000):
        mag = np.int32(unsigned_max & _U32(0x7FFFFFFF))
        biased = mag >> np.int32(23)
        power_of_two = ((mag & np.int32(0x7FFFFF)) == 0) & (biased != 0) & (biased != 255)
        key = max(key, mag - np.int32(power_of_two))
    return key


@njit(inline="always")
def _exponent_of_key(key):
    """floor(log2(value)) of a positive float's bits, clamped below at -128 (-128 for zero)."""
    biased = key >> 23
    if biased > 0:
        return biased - 127
    return -127 if key >= (1 << 22) else -128


@njit(inline="always")
def _round_segment(xs, outs, first, scale_a, scale_b, step, lo, hi, mode, k1, k2):
    """Round one slice lying inside one block; ``first`` is its flat index (dither counter).

    ``v = (x * scale_a) * scale_b`` is x in units of the step (two factors keep each a float32).
    """
    if mode == ROUND_STOCHASTIC:
        for j in range(xs.size):
            v = (xs[j] * scale_a) * scale_b
            f = np.floor(v)
            threshold = _U32((v - f) * _TWO_POW_32)
            h = _mix32(_mix32(_U32(first + j) ^ k1) ^ k2)
            r = f + _F32(h < threshold)
            outs[j] = (min(max(r, lo), hi) + _F32(0.0)) * step
    elif mode == ROUND_UP:
        for j in range(xs.size):
            r = np.ceil((xs[j] * scale_a) * scale_b)
            outs[j] = (min(max(r, lo), hi) + _F32(0.0)) * step
    else:
        for j in range(xs.size):
            r = np.rint((xs[j] * scale_a) * scale_b)
            outs[j] = (min(max(r, lo), hi) + _F32(0.0)) * step


# 2^k as float32 for k in [-149, 127], subnormals included: a table beats ldexp per block.
_POW2 = np.ldexp(np.float32(1.0), np.arange(-149, 128)).astype(np.float32)
_POW2_OFFSET = 149


def _block_keys(bits, block_len, keys):
    """keys[b] = the largest magnitude key of block b (see ``_segment_key_max``)."""
    n = bits.size
    for b in range(keys.size):
        keys[b] = _segment_key_max(bits[b * block_len : min(n, (b + 1) * block_len)])


def _round_blocks(x, block_len, nbits, mode, k1, k2, codes_only, keys, pow2, out, exps):
    """Round every element given its block's magnitude key (``out`` must not overlap ``x``:
    aliasing makes LLVM fall back to scalar code)."""
    n = x.size
    lo = _F32(-(1 << (nbits - 1)))
    hi = _F32((1 << (nbits - 1)) - 1)
    for b in range(keys.size):
        e = _exponent_of_key(keys[b])
        exps[b] = e
        k = nbits - 2 - e
        scale_a = pow2[k // 2 + _POW2_OFFSET]
        scale_b = pow2[k - k // 2 + _POW2_OFFSET]
        step = _F32(1.0) if codes_only else pow2[-k + _POW2_OFFSET]
        i0, i1 = b * block_len, min(n, (b + 1) * block_len)
        _round_segment(x[i0:i1], out[i0:i1], i0, scale_a, scale_b, step, lo, hi, mode, k1, k2)


# Serial on purpose: numba's thread pools (omp, workqueue) and Python threads fought torch's
# OpenMP pool for the cores here (10-35x slower training steps with numba's pools on small
# tensors; erratic 2-13 ms per 4M-element call with threads); single-threaded it is steady.
_keys_kernel = njit(cache=True, nogil=True)(_block_keys)
_round_kernel = njit(cache=True, nogil=True)(_round_blocks)


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
    """Block-quantize contiguous float32 ``x`` into ``out`` (not overlapping it) and ``exps``.

    Returns False, having written nothing, if ``x`` holds NaN or inf.
    """
    keys = np.zeros(exps.size, dtype=np.int32)
    _keys_kernel(x.view(np.int32), block_len, keys)
    if keys.size and keys.max() >= _FLOAT_EXPONENT_ALL_ONES:
        return False
    _round_kernel(
        x,
        block_len,
        bits,
        mode,
        np.uint32(key[0]),
        np.uint32(key[1]),
        codes_only,
        keys,
        _POW2,
        out,
        exps,
    )
    return True
