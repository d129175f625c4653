"""Many tensors through the fused CPU quantizer (``_cpu_kernels``) in one call per phase.

Each parameter, gradient or state tensor quantized on its own costs some 25 us of Python and
dispatch around a kernel that may run for a few. Here a table describes every tensor (its
address, length, block length, dither key words and scratch), and the same passes as the
single-tensor kernel run over all chunks of all tensors: block maxima, merging of partial
maxima where a block spans chunks, then rounding in place. A tensor's dither counter starts
at 0 and its key is the one a separate call would draw, so the results are bit-identical to
quantizing the tensors one after another.
"""

from __future__ import annotations

from array import array

import numpy as np
import torch
from numba import carray, cfunc, types

from ._cpu_kernels import (
    _U32,
    _array,
    _as_pointer,
    _chunking,
    _claim,
    _keys_range,
    _round_range,
)
from ._openmp import run_worker

# One row of the table per tensor (int64): address, length, block length, blocks, chunk
# length, chunks, key rows, first chunk (global), key words, keys and exponents addresses.
(_T_X, _T_N, _T_BLOCK, _T_BLOCKS, _T_CHUNK, _T_CHUNKS, _T_KEY_ROWS, _T_FIRST) = range(8)
(_T_K1, _T_K2, _T_KEYS, _T_EXPS) = range(8, 12)
_ROW = 12
# The call's header: table address, tensors, total chunks, bits, mode, phase, next claim.
(_H_TABLE, _H_TENSORS, _H_CHUNKS, _H_BITS, _H_MODE, _H_PHASE, _H_NEXT) = range(7)
_HEADER = 7
_PHASE_KEYS, _PHASE_MERGE, _PHASE_ROUND = 0, 1, 2


@cfunc(types.void(types.voidptr), cache=True, nopython=True)
def _multi_worker(data):
    """Claim global chunks (or, merging, tensors) until none is left; run the phase on each."""
    header = carray(data, _HEADER, dtype=np.int64)
    tensors = header[_H_TENSORS]
    table = carray(_as_pointer(header[_H_TABLE]), tensors * _ROW, dtype=np.int64)
    phase = header[_H_PHASE]
    total = tensors if phase == _PHASE_MERGE else header[_H_CHUNKS]
    while True:
        claim = _claim(data, _H_NEXT)
        if claim >= total:
            return
        t = claim
        if phase != _PHASE_MERGE:  # the tensor holding global chunk ``claim``
            t = 0
            while t + 1 < tensors and table[(t + 1) * _ROW + _T_FIRST] <= claim:
                t += 1
        row = table[t * _ROW : (t + 1) * _ROW]
        n, block_len, num_blocks = row[_T_N], row[_T_BLOCK], row[_T_BLOCKS]
        key_rows = row[_T_KEY_ROWS]
        keys = _array(row, _T_KEYS, key_rows * num_blocks, np.int32)
        if phase == _PHASE_MERGE:
            for r in range(1, key_rows):
                for b in range(num_blocks):
                    keys[b] = max(keys[b], keys[r * num_blocks + b])
            continue
        chunk = claim - row[_T_FIRST]
        start = chunk * row[_T_CHUNK]
        stop = min(n, start + row[_T_CHUNK])
        if phase == _PHASE_KEYS:
            k = chunk if key_rows > 1 else 0
            bits = _array(row, _T_X, n, np.int32)
            _keys_range(bits, block_len, start, stop, keys[k * num_blocks : (k + 1) * num_blocks])
        else:
            exps = _array(row, _T_EXPS, num_blocks, np.int16)
            x = _array(row, _T_X, n, np.float32)
            mode = header[_H_MODE]
            k1, k2 = _U32(row[_T_K1]), _U32(row[_T_K2])
            _round_range(
                x, block_len, start, stop, header[_H_BITS], mode, k1, k2, False,
                keys[:num_blocks], None, exps, None,
            )  # fmt: skip


def quantize_many_flat(
    tensors: list[torch.Tensor],
    block_lens: list[int],
    bits: int,
    mode: int,
    keys: list[tuple[int, int]],
) -> bool:
    """Block-quantize contiguous 1-d float32 CPU tensors in place, each with its block length
    and dither key words. Returns False, having written nothing, if any holds NaN or inf."""
    threads = torch.get_num_threads()
    rows = np.zeros((len(tensors), _ROW), dtype=np.int64)
    layouts = []
    first = 0
    for i, (x, block_len) in enumerate(zip(tensors, block_lens, strict=True)):
        n = x.numel()
        num_blocks = -(-n // block_len)
        chunk_len, num_chunks, key_rows = _chunking(n, block_len, threads)
        layouts.append((key_rows * num_blocks, num_blocks))
        rows[i, :_T_K1] = (x.data_ptr(), n, block_len, num_blocks, chunk_len, num_chunks,
                           key_rows, first)  # fmt: skip
        rows[i, _T_K1], rows[i, _T_K2] = keys[i]
        first += num_chunks
    key_sizes = [size for size, _ in layouts]
    exp_sizes = [blocks for _, blocks in layouts]
    all_keys = torch.zeros(sum(key_sizes), dtype=torch.int32)
    all_exps = torch.empty(sum(exp_sizes), dtype=torch.int16)
    rows[:, _T_KEYS] = all_keys.data_ptr() + 4 * np.cumsum([0, *key_sizes[:-1]])
    rows[:, _T_EXPS] = all_exps.data_ptr() + 2 * np.cumsum([0, *exp_sizes[:-1]])
    header = array("q", bytes(8 * _HEADER))
    header[_H_TABLE], header[_H_TENSORS], header[_H_CHUNKS] = rows.ctypes.data, len(tensors), first
    header[_H_BITS], header[_H_MODE] = bits, mode
    threads = min(threads, first)

    def run(phase: int) -> None:
        header[_H_PHASE], header[_H_NEXT] = phase, 0
        run_worker(_multi_worker, header, threads)

    run(_PHASE_KEYS)
    if int(all_keys.max()) >= 0x7F800000:
        return False
    run(_PHASE_MERGE)
    run(_PHASE_ROUND)
    return True
