"""Compiled CPU kernels (numba) for block-normalized low-bit optimizer state.

The same arithmetic as the vectorized torch path of ``state_codec.py``, fused into one pass
per block: the block's absolute maximum ``s``, then per element ``n = clamp(x / s, -1, 1)``,
its neighbouring codes from the lookup table (``state_codec._lower_index``), and the rounding
(nearest, or stochastic against the element's counter hash, ``dither.py``). The codes are
written in the wire layout: one index a byte at 8 bits; at 4 bits two a byte, low nibble
first, each as ``index ^ 8`` (the 4-bit two's-complement code ``index - 8`` of
``packing.pack_codes``). Decoding is ``Q[index] * s``.

Results equal the torch path's bit for bit (tested): float32 division and comparisons are
exact IEEE operations in both.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ._cpu_kernels import _mix32

_U32 = np.uint32
_F32 = np.float32
_TWO_POW_32 = _F32(4294967296.0)
_LARGEST_BELOW_TWO_POW_32 = _F32(4294967040.0)
STATE_OK, STATE_NOT_FINITE, STATE_NEGATIVE = 0, 1, 2


#: The lookup table's buckets (``state_codec._bucket_table``): a normalized value's float32
#: magnitude bits, clamped to [bits of 2^-32, bits of 1.0], minus the lower end, shifted
#: right by ``BUCKET_SHIFT``; one run of ``BUCKETS_PER_SIGN`` buckets per sign.
TINY_BITS = np.int32(0x2F800000)  # 2^-32, far below any map's smallest nonzero code
ONE_BITS = np.int32(0x3F800000)  # 1.0
BUCKET_SHIFT = np.int32(15)  # buckets of relative width 2^-8
BUCKETS_PER_SIGN = np.int32(((ONE_BITS - TINY_BITS) >> BUCKET_SHIFT) + 1)


def _bitcast(source, target):
    """An intrinsic reinterpreting a ``source`` scalar's bits as ``target`` (numba has no
    scalar ``view``)."""

    @intrinsic
    def bitcast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return bitcast


_float_bits = _bitcast(types.float32, types.int32)
_bits_to_float = _bitcast(types.int32, types.float32)


@njit(inline="always")
def _block_max(seg):
    """(largest magnitude's float bits, smallest value) of a slice: two plain reductions."""
    largest = np.int32(0)
    smallest = _F32(np.inf)
    for j in range(seg.size):
        largest = max(largest, _float_bits(seg[j]) & np.int32(0x7FFFFFFF))
        smallest = min(smallest, seg[j])
    return largest, smallest


@njit(inline="always")
def _round_block(seg, out, first, safe, values, table, stochastic, k1, k2):
    """Indices of one block's elements into ``out`` (uint8), branch-free: which neighbour
    each element takes depends on the data at random, and mispredicted branches would cost
    more than the arithmetic; loops run over slices from 0 so LLVM vectorizes them."""
    # unsigned indices: numba then skips its negative-index wraparound
    top = _U32(values.size - 1)
    counter = _U32(first)
    for j in range(seg.size):
        v = min(max(seg[j] / safe, _F32(-1.0)), _F32(1.0))
        vb = _float_bits(v)
        magnitude = min(max(vb & np.int32(0x7FFFFFFF), TINY_BITS), ONE_BITS) - TINY_BITS
        bucket = _U32((magnitude >> BUCKET_SHIFT) + np.int32(vb < 0) * BUCKETS_PER_SIGN)
        lower = _U32(table[bucket])
        nxt = min(lower + _U32(1), top)
        lower += _U32((values[nxt] <= v) & (nxt > lower))
        upper = min(max(lower + _U32(1), _U32(1)), top)
        lo = values[upper - _U32(1)]
        hi = values[upper]
        if stochastic:
            p = min(max((v - lo) / (hi - lo), _F32(0.0)), _F32(1.0))
            threshold = _U32(min(p * _TWO_POW_32, _LARGEST_BELOW_TWO_POW_32))
            take_hi = _mix32(_mix32(counter ^ k1) ^ k2) < threshold
        else:
            take_hi = (hi - v) < (v - lo)
        counter += _U32(1)
        out[j] = np.uint8(upper - _U32(1) + _U32(take_hi))


@njit(cache=True, nogil=True, error_model="numpy")
def encode_blocks(x, block, values, table, signed, stochastic, k1, k2, bits, codes, scales):
    """Encode float32 ``x`` (1-d) into ``codes`` (uint8, wire layout) and ``scales`` (one per
    ``block`` elements); returns ``STATE_OK``, or ``STATE_NOT_FINITE`` / ``STATE_NEGATIVE``
    (an unsigned map given a negative value) having written partial output."""
    n = x.size
    indices = codes if bits == 8 else np.empty(block, np.uint8)
    for b in range((n + block - 1) // block):
        start = b * block
        stop = min(n, start + block)
        seg = x[start:stop]
        largest, smallest = _block_max(seg)
        if largest >= np.int32(0x7F800000):  # NaN or inf
            return STATE_NOT_FINITE
        if not signed and smallest < 0:
            return STATE_NEGATIVE
        s = _bits_to_float(largest)
        scales[b] = s
        safe = s if s > 0 else _F32(1.0)
        out = indices[start:stop] if bits == 8 else indices[: stop - start]
        _round_block(seg, out, start, safe, values, table, stochastic, k1, k2)
        if bits == 4:  # two a byte, low nibble first, as index ^ 8; a block starts on a byte
            _pack_nibbles(out, codes, start)
    return STATE_OK


@njit(inline="always")
def _pack_nibbles(out, codes, start):
    half = out.size // 2
    dest = codes[start // 2 : start // 2 + (out.size + 1) // 2]
    for j in range(half):
        dest[j] = (out[2 * j] ^ np.uint8(8)) | ((out[2 * j + 1] ^ np.uint8(8)) << np.uint8(4))
    if out.size % 2:
        dest[half] = out[out.size - 1] ^ np.uint8(8)


@njit(cache=True, nogil=True, error_model="numpy")
def decode_blocks(codes, scales, block, values, bits, out):
    """``out[i] = Q[index_i] * scales[i // block]`` for codes in the wire layout, a block at a
    time (no division per element)."""
    n = out.size
    for b in range(scales.size):
        start = b * block
        stop = min(n, start + block)
        s = scales[b]
        dest = out[start:stop]
        if bits == 8:
            src = codes[start:stop]
            for j in range(dest.size):
                dest[j] = values[np.int32(src[j])] * s
        else:  # a block starts on a byte (even block length)
            src = codes[start // 2 : (stop + 1) // 2]
            for j in range(dest.size // 2):
                byte = np.int32(src[j])
                dest[2 * j] = values[(byte & 15) ^ 8] * s
                dest[2 * j + 1] = values[(byte >> 4) ^ 8] * s
            if dest.size % 2:
                dest[dest.size - 1] = values[(np.int32(src[dest.size // 2]) & 15) ^ 8] * s
