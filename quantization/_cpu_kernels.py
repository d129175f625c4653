"""Fused CPU kernel (numba) for block floating point; the same arithmetic as the torch path.

Two passes over the flat tensor: the first finds each block's largest magnitude (on the float
bits, so NaN/inf are caught for free), the second derives each block's exponent and
power-of-two scales and scales, dithers, rounds, clamps and writes every element. All element
arithmetic is float32 and uint32 (16 lanes per AVX-512 vector) and exact: scaling by powers of
two, ``floor``, ``v - floor(v)``.

Each pass splits the tensor into chunks that threads claim from an atomic counter: on torch's
own OpenMP threads when torch runs several (``_openmp.py``), else on the calling thread. Where
a block spans chunks, each chunk keeps its own partial maxima, merged before the second pass;
a dither depends only on the element's flat index, so results never depend on the threads.

Stochastic rounding adds one with probability ``floor(frac * 2^32) / 2^32`` (``frac = v -
floor(v)``), by comparing the 32-bit counter hash ``h`` (see ``dither.py``) with that integer:
unbiased to within 2^-32 of a step.
"""

from __future__ import annotations

from array import array

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from ._openmp import run_worker

_U32 = np.uint32
_F32 = np.float32
_TWO_POW_32 = _F32(4294967296.0)
_LARGEST_BELOW_TWO_POW_32 = _F32(4294967040.0)  # keeps the uint32 conversion in range
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
def _round_segment(xs, outs, first, stride, scale_a, scale_b, step, lo, hi, mode, k1, k2, codes):
    """Round one slice lying inside one block; ``first`` is its first element's dither counter
    (its logical flat index) and ``stride`` how much the counter grows from one element of the
    slice to the next (1, or H*W along the channels of a channels-last tensor).

    ``v = (x * scale_a) * scale_b`` is x in units of the step (two factors keep each a float32).
    ``codes``: None, or an int8 slice that also receives each element's integer code.
    """
    if mode == ROUND_STOCHASTIC:
        counter = _U32(first)  # a 32-bit induction variable: 16 lanes, not 8 of int64
        for j in range(xs.size):
            v = (xs[j] * scale_a) * scale_b
            f = np.floor(v)
            frac = v - f  # 1.0 exactly when v is a tiny negative: then round up, as torch does
            threshold = _U32(min(frac * _TWO_POW_32, _LARGEST_BELOW_TWO_POW_32))
            h = _mix32(_mix32(counter ^ k1) ^ k2)
            counter += _U32(stride)
            r = f + _F32((h < threshold) | (frac >= _F32(1.0)))
            c = min(max(r, lo), hi) + _F32(0.0)
            outs[j] = c * step
            if codes is not None:
                codes[j] = np.int8(c)
    elif mode == ROUND_UP:
        for j in range(xs.size):
            r = np.ceil((xs[j] * scale_a) * scale_b)
            c = min(max(r, lo), hi) + _F32(0.0)
            outs[j] = c * step
            if codes is not None:
                codes[j] = np.int8(c)
    else:
        for j in range(xs.size):
            r = np.rint((xs[j] * scale_a) * scale_b)
            c = min(max(r, lo), hi) + _F32(0.0)
            outs[j] = c * step
            if codes is not None:
                codes[j] = np.int8(c)


# 2^k as float32 for k in [-149, 127], subnormals included: a table beats ldexp per block.
_POW2 = np.ldexp(np.float32(1.0), np.arange(-149, 128)).astype(np.float32)
_POW2_OFFSET = 149


@njit(inline="always")
def _keys_range(bits, block_len, start, stop, keys):
    """keys[b] = the largest magnitude key (``_segment_key_max``) of block b's elements in
    ``[start, stop)``, for each block that range overlaps."""
    for b in range(start // block_len, (stop - 1) // block_len + 1):
        i0, i1 = max(start, b * block_len), min(stop, (b + 1) * block_len)
        keys[b] = _segment_key_max(bits[i0:i1])


@njit(inline="always")
def _block_scaling(key, nbits, codes_only):
    """(exponent, scale_a, scale_b, step) of a block from its magnitude key."""
    e = _exponent_of_key(key)
    k = nbits - 2 - e
    scale_a = _POW2[k // 2 + _POW2_OFFSET]
    scale_b = _POW2[k - k // 2 + _POW2_OFFSET]
    step = _F32(1.0) if codes_only else _POW2[-k + _POW2_OFFSET]
    return e, scale_a, scale_b, step


@njit(inline="always")
def _round_slice(
    x, out, codes, i0, i1, first, stride, scale_a, scale_b, step, lo, hi, mode, k1, k2
):
    """``_round_segment`` of ``x[i0:i1]`` into ``out`` (None: in place, through the very same
    slice, as two would look like aliases to LLVM) and, unless None, ``codes``."""
    xs = x[i0:i1]
    if out is None:
        _round_segment(xs, xs, first, stride, scale_a, scale_b, step, lo, hi, mode, k1, k2, None)
    elif codes is None:
        outs = out[i0:i1]
        _round_segment(xs, outs, first, stride, scale_a, scale_b, step, lo, hi, mode, k1, k2, None)
    else:
        outs, cs = out[i0:i1], codes[i0:i1]
        _round_segment(xs, outs, first, stride, scale_a, scale_b, step, lo, hi, mode, k1, k2, cs)


@njit(cache=True)  # not inlined: each ``out`` type (None included) compiles on its own
def _round_range(
    x, block_len, start, stop, nbits, mode, k1, k2, codes_only, keys, out, exps, codes
):
    """Round the elements in ``[start, stop)`` given their blocks' magnitude keys, into ``out``
    or, when it is None, into ``x``; the range holding a block's first element writes its
    exponent."""
    lo = _F32(-(1 << (nbits - 1)))
    hi = _F32((1 << (nbits - 1)) - 1)
    for b in range(start // block_len, (stop - 1) // block_len + 1):
        e, scale_a, scale_b, step = _block_scaling(keys[b], nbits, codes_only)
        if b * block_len >= start:
            exps[b] = e
        i0, i1 = max(start, b * block_len), min(stop, (b + 1) * block_len)
        _round_slice(x, out, codes, i0, i1, i0, 1, scale_a, scale_b, step, lo, hi, mode, k1, k2)


@njit(cache=True)  # not inlined, as ``_round_range``
def _round_rows(
    x, row_len, plane, start, stop, nbits, mode, k1, k2, codes_only, keys, out, exps, codes
):
    """``_round_range`` for a one-block tensor stored channels-last: ``x`` holds rows of
    ``row_len`` channels, one row per (n, h, w), and the dither counter of element ``c`` of row
    ``r`` is its logical (NCHW) index ``(r // plane) * row_len * plane + r % plane + c * plane``,
    so results equal those of the same tensor stored contiguously."""
    lo = _F32(-(1 << (nbits - 1)))
    hi = _F32((1 << (nbits - 1)) - 1)
    e, scale_a, scale_b, step = _block_scaling(keys[0], nbits, codes_only)
    if start == 0:
        exps[0] = e
    i0 = start
    while i0 < stop:
        row = i0 // row_len
        channel = i0 - row * row_len
        i1 = min(stop, (row + 1) * row_len)
        sample = row // plane
        first = sample * row_len * plane + (row - sample * plane) + channel * plane
        _round_slice(
            x, out, codes, i0, i1, first, plane, scale_a, scale_b, step, lo, hi, mode, k1, k2
        )
        i0 = i1


# The worker reads its arguments from one int64 vector (addresses and scalars), so the same
# compiled callback serves the calling thread and torch's OpenMP threads.
(_X, _OUT, _KEYS, _EXPS, _N, _NUM_BLOCKS, _BLOCK_LEN, _CHUNK_LEN, _NUM_CHUNKS) = range(9)
(_KEY_ROWS, _BITS, _MODE, _K1, _K2, _CODES_ONLY, _OUT_KIND, _PHASE, _NEXT_CHUNK) = range(9, 18)
(_ROW_LEN, _PLANE) = range(18, 20)  # channels-last layout (``_round_rows``); 0: flat
_CODES = 20  # int8 codes written beside float32 values (``_OUT_FLOAT32_AND_CODES``)
_NUM_ARGS = 21
_PHASE_KEYS, _PHASE_ROUND = 0, 1
_OUT_FLOAT32, _OUT_INT8, _OUT_INT16, _IN_PLACE, _OUT_FLOAT32_AND_CODES = range(5)
_OUT_KINDS = {torch.float32: _OUT_FLOAT32, torch.int8: _OUT_INT8, torch.int16: _OUT_INT16}
MIN_CHUNK = 1 << 15  # elements; smaller chunks cost more to hand out than they save
CHUNKS_PER_THREAD = 4  # a thread the machine preempts delays only its current chunk


@intrinsic
def _as_pointer(typingctx, address):
    """An int64 address as a void pointer."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


@intrinsic
def _claim(typingctx, data, slot):
    """Atomically add one to the int64 ``data[slot]``; returns the value before."""
    sig = types.int64(types.voidptr, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        counter = builder.gep(builder.bitcast(args[0], i64.as_pointer()), [args[1]])
        return builder.atomic_rmw("add", counter, ir.Constant(i64, 1), "monotonic")

    return sig, codegen


@njit(inline="always")
def _array(args, slot, size, dtype):
    return carray(_as_pointer(args[slot]), size, dtype=dtype)


@njit(inline="always")
def _round_chunk(args, start, stop, x, out, codes):
    num_blocks = args[_NUM_BLOCKS]
    keys = _array(args, _KEYS, num_blocks, np.int32)
    exps = _array(args, _EXPS, num_blocks, np.int16)
    rounding = (args[_BITS], args[_MODE], _U32(args[_K1]), _U32(args[_K2]), args[_CODES_ONLY] != 0)
    if args[_ROW_LEN] > 0:
        _round_rows(x, args[_ROW_LEN], args[_PLANE], start, stop, *rounding, keys, out, exps, codes)
    else:
        _round_range(x, args[_BLOCK_LEN], start, stop, *rounding, keys, out, exps, codes)


@cfunc(types.void(types.voidptr), cache=True, nopython=True)
def _worker(data):
    """Claim chunks of the flat array until none is left and run the current phase on each."""
    args = carray(data, _NUM_ARGS, dtype=np.int64)
    n, num_blocks, block_len, chunk_len = (
        args[_N],
        args[_NUM_BLOCKS],
        args[_BLOCK_LEN],
        args[_CHUNK_LEN],
    )
    while True:
        chunk = _claim(data, _NEXT_CHUNK)
        if chunk >= args[_NUM_CHUNKS]:
            return
        start = chunk * chunk_len
        stop = min(n, start + chunk_len)
        if args[_PHASE] == _PHASE_KEYS:
            row = chunk if args[_KEY_ROWS] > 1 else 0
            keys = _array(args, _KEYS, args[_KEY_ROWS] * num_blocks, np.int32)
            bits = _array(args, _X, n, np.int32)
            _keys_range(
                bits, block_len, start, stop, keys[row * num_blocks : (row + 1) * num_blocks]
            )
        else:
            x = _array(args, _X, n, np.float32)
            kind = args[_OUT_KIND]
            if kind == _IN_PLACE:
                _round_chunk(args, start, stop, x, None, None)
            elif kind == _OUT_FLOAT32:
                _round_chunk(args, start, stop, x, _array(args, _OUT, n, np.float32), None)
            elif kind == _OUT_FLOAT32_AND_CODES:
                values = _array(args, _OUT, n, np.float32)
                _round_chunk(args, start, stop, x, values, _array(args, _CODES, n, np.int8))
            elif kind == _OUT_INT8:
                _round_chunk(args, start, stop, x, _array(args, _OUT, n, np.int8), None)
            else:
                _round_chunk(args, start, stop, x, _array(args, _OUT, n, np.int16), None)


def _chunking(n: int, block_len: int, threads: int) -> tuple[int, int, int]:
    """(chunk length, number of chunks, key rows): chunks hold whole blocks where blocks are
    shorter than a chunk (one row of keys); else a block spans chunks and each chunk keeps
    its own row of partial maxima."""
    chunk_len = max(MIN_CHUNK, -(-n // (threads * CHUNKS_PER_THREAD)))
    if block_len <= chunk_len:
        chunk_len = -(-chunk_len // block_len) * block_len
    num_chunks = -(-n // chunk_len)
    return chunk_len, num_chunks, (1 if block_len <= chunk_len else num_chunks)


def _run(args: array, phase: int, threads: int) -> None:
    args[_PHASE] = phase
    args[_NEXT_CHUNK] = 0
    run_worker(_worker, args, threads)


def quantize_flat(
    x: torch.Tensor,
    block_len: int,
    bits: int,
    mode: int,
    key: tuple[int, int],
    codes_only: bool,
    out: torch.Tensor,
    exps: torch.Tensor,
    rows: tuple[int, int] = (0, 0),
    codes: torch.Tensor | None = None,
) -> bool:
    """Block-quantize contiguous 1-d float32 CPU ``x`` into ``out`` and int16 ``exps``.

    ``out``: float32 values or int8/int16 codes, either ``x`` itself or not overlapping it.
    ``rows``: ``(C, H*W)`` when ``x`` is a one-block tensor's channels-last memory (dither
    counters then follow the logical NCHW order, see ``_round_rows``); ``(0, 0)``: flat.
    ``codes``: an int8 tensor (formats of at most 8 bits) that also receives the integer codes
    of the float32 values written to ``out``.
    Runs on torch's threads when torch has several and ``x`` is large. Returns False, having
    written nothing, if ``x`` holds NaN or inf.
    """
    n, num_blocks = x.numel(), exps.numel()
    if n == 0:
        return True
    threads = torch.get_num_threads()
    chunk_len, num_chunks, key_rows = _chunking(n, block_len, threads)
    keys = torch.zeros(key_rows * num_blocks, dtype=torch.int32)
    args = array("q", bytes(8 * _NUM_ARGS))
    args[_X], args[_OUT], args[_EXPS] = x.data_ptr(), out.data_ptr(), exps.data_ptr()
    args[_KEYS], args[_N], args[_NUM_BLOCKS] = keys.data_ptr(), n, num_blocks
    args[_BLOCK_LEN], args[_CHUNK_LEN], args[_NUM_CHUNKS] = block_len, chunk_len, num_chunks
    args[_KEY_ROWS], args[_BITS], args[_MODE] = key_rows, bits, mode
    args[_K1], args[_K2], args[_CODES_ONLY] = key[0], key[1], int(codes_only)
    args[_OUT_KIND] = _IN_PLACE if out.data_ptr() == x.data_ptr() else _OUT_KINDS[out.dtype]
    args[_ROW_LEN], args[_PLANE] = rows
    if codes is not None:
        args[_OUT_KIND], args[_CODES] = _OUT_FLOAT32_AND_CODES, codes.data_ptr()
    threads = min(threads, num_chunks)
    _run(args, _PHASE_KEYS, threads)
    if key_rows > 1:
        keys = keys.view(key_rows, num_blocks).amax(dim=0)
        args[_KEYS] = keys.data_ptr()
    if int(keys.max()) >= _FLOAT_EXPONENT_ALL_ONES:
        return False
    _run(args, _PHASE_ROUND, threads)
    return True
