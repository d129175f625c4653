"""Compiled CPU kernels (numba) for block-normalized low-bit optimizer state.

The same arithmetic as the vectorized torch path of ``state_codec.py``, fused into one pass
per block: the block's absolute maximum ``s``, then per element ``n = clamp(x / s, -1, 1)``,
its neighbouring codes from the lookup table (``state_codec._lower_index``), and the rounding
(nearest, or stochastic against the element's counter hash, ``dither.py``). The codes are
written in the wire layout: one index a byte at 8 bits; at 4 bits two a byte, low nibble
first, each as ``index ^ 8`` (the 4-bit two's-complement code ``index - 8`` of
``packing.pack_codes``). Decoding is ``Q[index] * s``.

Results equal the torch path's bit for bit (tested): float32 division and comparisons are
exact IEEE operations in both. Chunks of whole blocks run on torch's own OpenMP threads, as
the BFP kernel's do (``_openmp.py``).
"""

from __future__ import annotations

from array import array

import numpy as np
import torch
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from ._cpu_kernels import (
    _LARGEST_BELOW_TWO_POW_32,
    _TWO_POW_32,
    _as_pointer,
    _chunking,
    _claim,
    _mix32,
)
from ._openmp import run_worker

_U32 = np.uint32
_F32 = np.float32
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
def _normalize(seg, safe, normalized, buckets):
    """``n = clamp(x / s, -1, 1)`` and its lookup bucket, per element (vectorizes)."""
    for j in range(seg.size):
        v = min(max(seg[j] / safe, _F32(-1.0)), _F32(1.0))
        normalized[j] = v
        vb = _float_bits(v)
        magnitude = min(max(vb & np.int32(0x7FFFFFFF), TINY_BITS), ONE_BITS) - TINY_BITS
        buckets[j] = _U32((magnitude >> BUCKET_SHIFT) + np.int32(vb < 0) * BUCKETS_PER_SIGN)


@njit(inline="always")
def _neighbours(normalized, uppers, lows, highs, values, table):
    """The neighbouring codes ``lo <= n < hi`` of each value, from its bucket (in ``uppers``
    on entry, the index of ``hi`` on return): the table loads, kept in a loop of their own."""
    top = _U32(values.size - 1)
    for j in range(normalized.size):
        lower = _U32(table[uppers[j]])
        nxt = min(lower + _U32(1), top)
        lower += _U32((values[nxt] <= normalized[j]) & (nxt > lower))
        upper = min(max(lower + _U32(1), _U32(1)), top)
        uppers[j] = upper
        lows[j] = values[upper - _U32(1)]
        highs[j] = values[upper]


@njit(inline="always")
def _round_indices(normalized, uppers, lows, highs, stochastic, first, k1, k2, indices):
    """Each value's code index: ``hi`` or ``lo``, nearest or against the counter hash of its
    flat index ``first + j`` (vectorizes)."""
    if stochastic:
        for j in range(normalized.size):
            lo, hi = lows[j], highs[j]
            p = min(max((normalized[j] - lo) / (hi - lo), _F32(0.0)), _F32(1.0))
            threshold = _U32(min(p * _TWO_POW_32, _LARGEST_BELOW_TWO_POW_32))
            take_hi = _mix32(_mix32((first + _U32(j)) ^ k1) ^ k2) < threshold
            indices[j] = np.uint8(uppers[j] - _U32(1) + _U32(take_hi))
    else:
        for j in range(normalized.size):
            lo, hi, v = lows[j], highs[j], normalized[j]
            indices[j] = np.uint8(uppers[j] - _U32(1) + _U32((hi - v) < (v - lo)))


@njit(cache=True, nogil=True, error_model="numpy")
def _encode_range(x, block, values, table, signed, stochastic, k1, k2, bits, codes, scales, b0, b1):
    """Encode blocks ``[b0, b1)`` of float32 ``x``; returns a ``STATE_*`` status.

    Each block goes through three loops over scratch arrays rather than one: the arithmetic
    ones vectorize, and only the table loads stay scalar (LLVM does not vectorize gathers on
    every CPU, AMD's Zen among them; fused, the whole loop was scalar, 4x slower)."""
    n = x.size
    normalized = np.empty(block, np.float32)
    uppers = np.empty(block, np.uint32)
    lows = np.empty(block, np.float32)
    highs = np.empty(block, np.float32)
    indices = np.empty(block, np.uint8)
    for b in range(b0, b1):
        start = b * block
        stop = min(n, start + block)
        seg = x[start:stop]
        m = seg.size
        largest, smallest = _block_max(seg)
        if largest >= np.int32(0x7F800000):  # NaN or inf
            return STATE_NOT_FINITE
        if not signed and smallest < 0:
            return STATE_NEGATIVE
        s = _bits_to_float(largest)
        scales[b] = s
        safe = s if s > 0 else _F32(1.0)
        v, up, lo, hi, ix = normalized[:m], uppers[:m], lows[:m], highs[:m], indices[:m]
        _normalize(seg, safe, v, up)
        _neighbours(v, up, lo, hi, values, table)
        _round_indices(v, up, lo, hi, stochastic, _U32(start), k1, k2, ix)
        if bits == 8:
            out = codes[start:stop]
            for j in range(m):
                out[j] = ix[j]
        else:  # two a byte, low nibble first, as index ^ 8; a block starts on a byte
            out = codes[start // 2 : (stop + 1) // 2]
            for j in range(m // 2):
                out[j] = (ix[2 * j] ^ np.uint8(8)) | ((ix[2 * j + 1] ^ np.uint8(8)) << np.uint8(4))
            if m % 2:
                out[m // 2] = ix[m - 1] ^ np.uint8(8)
    return STATE_OK


# The worker reads its arguments from one int64 vector (addresses and scalars), so the same
# compiled callback serves the calling thread and torch's OpenMP threads (as in _cpu_kernels).
(_X, _CODES, _SCALES, _VALUES, _TABLE, _N, _BLOCK, _NUM_VALUES) = range(8)
(_SIGNED, _STOCHASTIC, _K1, _K2, _BITS, _CHUNK_BLOCKS, _NUM_CHUNKS, _NEXT, _STATUS) = range(8, 17)
_NUM_ARGS = 17


@cfunc(types.void(types.voidptr), cache=True, nopython=True)
def _encode_worker(data):
    """Claim chunks of whole blocks until none is left and encode each."""
    args = carray(data, _NUM_ARGS, dtype=np.int64)
    n, block, bits = args[_N], args[_BLOCK], args[_BITS]
    num_blocks = (n + block - 1) // block
    x = carray(_as_pointer(args[_X]), n, dtype=np.float32)
    codes = carray(_as_pointer(args[_CODES]), n if bits == 8 else (n + 1) // 2, dtype=np.uint8)
    scales = carray(_as_pointer(args[_SCALES]), num_blocks, dtype=np.float32)
    values = carray(_as_pointer(args[_VALUES]), args[_NUM_VALUES], dtype=np.float32)
    table = carray(_as_pointer(args[_TABLE]), 2 * BUCKETS_PER_SIGN, dtype=np.uint8)
    k1, k2 = _U32(args[_K1]), _U32(args[_K2])
    while True:
        chunk = _claim(data, _NEXT)
        if chunk >= args[_NUM_CHUNKS]:
            return
        b0 = chunk * args[_CHUNK_BLOCKS]
        b1 = min(num_blocks, b0 + args[_CHUNK_BLOCKS])
        status = _encode_range(
            x,
            block,
            values,
            table,
            args[_SIGNED] != 0,
            args[_STOCHASTIC] != 0,
            k1,
            k2,
            bits,
            codes,
            scales,
            b0,
            b1,
        )
        if status != STATE_OK:
            args[_STATUS] = status


def encode_blocks(x, block, values, table, signed, stochastic, k1, k2, bits, codes, scales):
    """Encode contiguous float32 ``x`` (1-d CPU tensor) into ``codes`` (uint8, wire layout)
    and ``scales`` (one per ``block`` elements), given the map's ``values`` (float32) and
    lookup ``table`` (uint8) as contiguous tensors; on torch's OpenMP threads when torch runs
    several and ``x`` is large. Returns ``STATE_OK``, or ``STATE_NOT_FINITE`` /
    ``STATE_NEGATIVE`` (an unsigned map given a negative value) having written partial output.
    Results do not depend on the threads: a dither depends only on the element's index.
    Addresses are read with ``data_ptr()``: numpy's ``ctypes.data`` costs microseconds a call,
    and an optimizer step encodes every state tensor."""
    n = x.numel()
    if n == 0:
        return STATE_OK
    num_blocks = -(-n // block)
    threads = torch.get_num_threads()
    chunk_len, _, _ = _chunking(n, block, threads)  # the BFP kernel's chunks, whole blocks here
    chunk_blocks = max(1, chunk_len // block)
    num_chunks = -(-num_blocks // chunk_blocks)
    args = array("q", bytes(8 * _NUM_ARGS))
    args[_X], args[_CODES], args[_SCALES] = x.data_ptr(), codes.data_ptr(), scales.data_ptr()
    args[_VALUES], args[_TABLE] = values.data_ptr(), table.data_ptr()
    args[_N], args[_BLOCK], args[_NUM_VALUES] = n, block, values.numel()
    args[_SIGNED], args[_STOCHASTIC] = int(signed), int(stochastic)
    args[_K1], args[_K2] = int(k1), int(k2)
    args[_BITS], args[_CHUNK_BLOCKS], args[_NUM_CHUNKS] = bits, chunk_blocks, num_chunks
    run_worker(_encode_worker, args, min(threads, num_chunks))
    return args[_STATUS]


@njit(inline="always")
def _decode(codes, scales, block, values, bits, out):
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


(_D_CODES, _D_SCALES, _D_VALUES, _D_OUT, _D_N, _D_BLOCK, _D_NUM_VALUES, _D_BITS) = range(8)


@cfunc(types.void(types.voidptr), cache=True, nopython=True)
def _decode_worker(data):
    """``_decode`` on the arrays an int64 argument vector points at."""
    args = carray(data, 8, dtype=np.int64)
    n, block, bits = args[_D_N], args[_D_BLOCK], args[_D_BITS]
    num_blocks = (n + block - 1) // block
    codes = carray(_as_pointer(args[_D_CODES]), n if bits == 8 else (n + 1) // 2, dtype=np.uint8)
    scales = carray(_as_pointer(args[_D_SCALES]), num_blocks, dtype=np.float32)
    values = carray(_as_pointer(args[_D_VALUES]), args[_D_NUM_VALUES], dtype=np.float32)
    out = carray(_as_pointer(args[_D_OUT]), n, dtype=np.float32)
    _decode(codes, scales, block, values, bits, out)


def decode_blocks(codes, scales, block, values, bits, out):
    """Decode ``codes`` (uint8, wire layout) and ``scales`` into float32 ``out`` (contiguous
    CPU tensors; ``values`` is the map) on the calling thread, through a compiled callback:
    calling a numba function with arrays costs more than the decode of a small tensor."""
    if out.numel() == 0:
        return
    args = array("q", [0] * 8)
    args[_D_CODES], args[_D_SCALES] = codes.data_ptr(), scales.data_ptr()
    args[_D_VALUES], args[_D_OUT] = values.data_ptr(), out.data_ptr()
    args[_D_N], args[_D_BLOCK] = out.numel(), block
    args[_D_NUM_VALUES], args[_D_BITS] = values.numel(), bits
    run_worker(_decode_worker, args, 1)
