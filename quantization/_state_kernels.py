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
from typing import NamedTuple

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


#: Float bits read as uint32 above this are negative and nonzero (-0.0 is exactly this).
_NEGATIVE_ZERO_BITS = np.uint32(0x80000000)


@njit(inline="always")
def _block_max(seg):
    """(largest magnitude's float bits, largest float bits read as uint32) of a slice: two
    integer reductions, which vectorize (a float ``min`` does not without fast-math: 0.75
    against 0.19 ns a value on a Zen 3). The second exceeds ``_NEGATIVE_ZERO_BITS`` exactly
    when the slice holds a negative nonzero value, NaN and inf aside."""
    largest = np.int32(0)
    as_unsigned = np.uint32(0)
    for j in range(seg.size):
        bits = _float_bits(seg[j])
        largest = max(largest, bits & np.int32(0x7FFFFFFF))
        as_unsigned = max(as_unsigned, np.uint32(bits))
    return largest, as_unsigned


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
    on entry, the index of ``hi`` on return): the table loads, kept in a loop of their own.

    ``values`` is the map followed by one +inf (``state_codec.kernel_values``), so the look
    at the next code needs no bounds check; the one clamp left keeps the top code's pair
    ``(top - 1, top)``, as the torch path's. (Clamping every index compiled to branches
    around each element's dependent loads.)"""
    top = _U32(values.size - 2)  # the sentinel is the last entry
    for j in range(normalized.size):
        lower = _U32(table[uppers[j]])
        lower += _U32(values[lower + _U32(1)] <= normalized[j])
        lower = min(lower, top - _U32(1))
        uppers[j] = lower + _U32(1)
        lows[j] = values[lower]
        highs[j] = values[lower + _U32(1)]


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
        largest, as_unsigned = _block_max(seg)
        if largest >= np.int32(0x7F800000):  # NaN or inf
            return STATE_NOT_FINITE
        if not signed and as_unsigned > _NEGATIVE_ZERO_BITS:  # a value below zero
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


# One row per tensor of an int64 table (addresses and scalars), and a call's header, so the
# same compiled callback serves the calling thread and torch's OpenMP threads (as in
# _cpu_kernels) and one call covers every state tensor of an optimizer step: each tensor on
# its own costs some 20 us of Python and dispatch around a kernel that may run for a few.
(_R_X, _R_CODES, _R_SCALES, _R_VALUES, _R_TABLE, _R_N, _R_BLOCK, _R_NUM_VALUES) = range(8)
(_R_SIGNED, _R_STOCHASTIC, _R_K1, _R_K2, _R_BITS, _R_CHUNK_BLOCKS, _R_FIRST) = range(8, 15)
_ROW = 15
(_H_TABLE, _H_TENSORS, _H_CHUNKS, _H_NEXT, _H_STATUS, _H_DECODE) = range(6)
_HEADER = 6


@njit(inline="always")
def _row_of(table, tensors, chunk):
    """The row of the tensor holding global chunk ``chunk`` (rows in order of first chunk)."""
    lo, hi = 0, tensors - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table[mid * _ROW + _R_FIRST] <= chunk:
            lo = mid
        else:
            hi = mid - 1
    return table[lo * _ROW : (lo + 1) * _ROW]


@njit(inline="always")
def _row_arrays(row):
    """(codes, scales, values) of a row: its packed codes, one scale a block, the map."""
    n, block, bits = row[_R_N], row[_R_BLOCK], row[_R_BITS]
    num_blocks = (n + block - 1) // block
    codes = carray(_as_pointer(row[_R_CODES]), n if bits == 8 else (n + 1) // 2, dtype=np.uint8)
    scales = carray(_as_pointer(row[_R_SCALES]), num_blocks, dtype=np.float32)
    values = carray(_as_pointer(row[_R_VALUES]), row[_R_NUM_VALUES], dtype=np.float32)
    return codes, scales, values


@njit(inline="always")
def _next_blocks(data):
    """(row, first block, end block) of the next unclaimed chunk of any tensor of the call;
    the end is -1 when none is left."""
    header = carray(data, _HEADER, dtype=np.int64)
    tensors = header[_H_TENSORS]
    table = carray(_as_pointer(header[_H_TABLE]), tensors * _ROW, dtype=np.int64)
    chunk = _claim(data, _H_NEXT)
    if chunk >= header[_H_CHUNKS]:
        return table[:_ROW], 0, -1
    row = _row_of(table, tensors, chunk)
    num_blocks = (row[_R_N] + row[_R_BLOCK] - 1) // row[_R_BLOCK]
    b0 = (chunk - row[_R_FIRST]) * row[_R_CHUNK_BLOCKS]
    return row, b0, min(num_blocks, b0 + row[_R_CHUNK_BLOCKS])


@njit(inline="always")
def _decode_range(codes, scales, block, values, bits, out, b0, b1):
    """``out[i] = Q[index_i] * scales[i // block]`` over blocks ``[b0, b1)``, codes in the
    wire layout, a block at a time (no division per element)."""
    n = out.size
    for b in range(b0, b1):
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


@cfunc(types.void(types.voidptr), cache=True, nopython=True)
def _worker(data):
    """Claim chunks of whole blocks (of any tensor) until none is left, and encode each row's
    float32 ``x`` into its codes and scales, or decode them into ``x``."""
    decode = carray(data, _HEADER, dtype=np.int64)[_H_DECODE] != 0
    while True:
        row, b0, b1 = _next_blocks(data)
        if b1 < 0:
            return
        codes, scales, values = _row_arrays(row)
        x = carray(_as_pointer(row[_R_X]), row[_R_N], dtype=np.float32)
        if decode:
            _decode_range(codes, scales, row[_R_BLOCK], values, row[_R_BITS], x, b0, b1)
            continue
        lookup = carray(_as_pointer(row[_R_TABLE]), 2 * BUCKETS_PER_SIGN, dtype=np.uint8)
        status = _encode_range(
            x,
            row[_R_BLOCK],
            values,
            lookup,
            row[_R_SIGNED] != 0,
            row[_R_STOCHASTIC] != 0,
            _U32(row[_R_K1]),
            _U32(row[_R_K2]),
            row[_R_BITS],
            codes,
            scales,
            b0,
            b1,
        )
        if status != STATE_OK:
            carray(data, _HEADER, dtype=np.int64)[_H_STATUS] = status


class Layout(NamedTuple):
    """One tensor of a multi-tensor call: its float32 values (``x``: the input of an encode,
    the output of a decode), packed ``codes``, ``scales``, and its map's ``values`` (followed
    by +inf) and lookup ``table`` (contiguous CPU tensors), the block length, bits,
    signedness, and the dither key words of stochastic rounding (``None``: nearest)."""

    x: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    values: torch.Tensor
    table: torch.Tensor
    block: int
    bits: int
    signed: bool
    key: tuple[int, int] | None


class Plan:
    """The kernel table of a list of layouts, built once: one int64 row per nonempty tensor
    (addresses and scalars; plain ``array``, as numpy slice assignments cost microseconds
    each), whose ``x`` addresses and dither keys may be rewritten between calls. Keeps the
    layouts' tensors alive, except ``x``: set it before each call that needs a new one."""

    def __init__(self, layouts: list[Layout]) -> None:
        threads = torch.get_num_threads()
        table: list[int] = []
        self.rows: list[int | None] = []  # each layout's row, None for an empty tensor
        self.chunks = 0
        for t in layouts:
            n = t.x.numel()
            if n == 0:
                self.rows.append(None)
                continue
            self.rows.append(len(table) // _ROW)
            chunk_len, _, _ = _chunking(n, t.block, threads)  # the BFP kernel's, whole blocks
            chunk_blocks = max(1, chunk_len // t.block)
            k1, k2 = t.key if t.key is not None else (0, 0)
            table += (
                t.x.data_ptr(), t.codes.data_ptr(), t.scales.data_ptr(), t.values.data_ptr(),
                t.table.data_ptr(), n, t.block, t.values.numel(),
                int(t.signed), int(t.key is not None), k1, k2, t.bits, chunk_blocks, self.chunks,
            )  # fmt: skip
            num_blocks = -(-n // t.block)
            self.chunks += -(-num_blocks // chunk_blocks)
        self._table = array("q", table)
        self._tensors = [(t.codes, t.scales, t.values, t.table) for t in layouts]

    def set_x(self, index: int, address: int) -> None:
        """Point layout ``index``'s float32 values at ``address`` (same length)."""
        row = self.rows[index]
        if row is not None:
            self._table[row * _ROW + _R_X] = address

    def set_key(self, index: int, key: tuple[int, int]) -> None:
        """Give stochastic layout ``index`` new dither key words."""
        row = self.rows[index]
        if row is not None:
            self._table[row * _ROW + _R_K1], self._table[row * _ROW + _R_K2] = key

    def run(self, decode: bool) -> int:
        """Encode (or decode) every row, chunks of whole blocks of all tensors shared out over
        torch's threads; the status."""
        if not self.chunks:
            return STATE_OK
        header = array("q", bytes(8 * _HEADER))
        header[_H_TABLE], header[_H_TENSORS] = (
            self._table.buffer_info()[0],
            len(self._table) // _ROW,
        )
        header[_H_CHUNKS], header[_H_DECODE] = self.chunks, int(decode)
        run_worker(_worker, header, min(torch.get_num_threads(), self.chunks))
        return header[_H_STATUS]


def encode_many(layouts: list[Layout]) -> int:
    """Encode each layout's contiguous float32 ``x`` into its ``codes`` (uint8, wire layout)
    and ``scales`` (one per block), all tensors in one call, on torch's OpenMP threads when
    torch runs several. Returns ``STATE_OK``, or ``STATE_NOT_FINITE`` / ``STATE_NEGATIVE`` (an
    unsigned map given a negative value) having written partial output. Results do not
    depend on the threads or on which tensors share the call: a dither depends only on the
    element's index and its tensor's key. Addresses are read with ``data_ptr()``: numpy's
    ``ctypes.data`` costs microseconds a call."""
    return Plan(layouts).run(decode=False)


def decode_many(layouts: list[Layout]) -> None:
    """Decode each layout's ``codes`` and ``scales`` into its float32 ``x``, all in one call."""
    Plan(layouts).run(decode=True)
