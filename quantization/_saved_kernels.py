"""Numba kernels for what backward keeps: ReLU's bit masks, and the codes of grid values.

``positive_bits(x)`` packs ``x > 0`` eight elements a byte (element ``i`` is bit ``i % 8`` of
byte ``i // 8``, in memory order); ``zero_where_clear_(g, bits)`` sets to +0.0, in place,
every element of ``g`` whose bit is clear: ReLU's backward (``threshold_backward(g, out, 0)``)
with ``out > 0`` read from the bits. Both take dense float32 CPU tensors and walk them in
memory order, so the tensor a mask was packed from and the gradient it masks must be stored
alike (the caller makes them so).

``codes_of_values(values, step)``: the int8 codes of values that are exactly ``code * step``
(one power-of-two step): ``values / step``, exact, in one pass without a float temporary.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

_BITS_PER_BYTE = 8


# signatures given: compiled at import (and cached), as the other kernels are
@njit("void(float32[::1], uint8[::1])", cache=True)
def _pack_positive(x, bits):
    whole = x.size // _BITS_PER_BYTE
    for j in range(whole):
        byte = np.uint8(0)
        for k in range(_BITS_PER_BYTE):
            byte |= np.uint8(x[j * _BITS_PER_BYTE + k] > 0) << np.uint8(k)
        bits[j] = byte
    if whole < bits.size:  # the last, partial byte
        byte = np.uint8(0)
        for k in range(x.size - whole * _BITS_PER_BYTE):
            byte |= np.uint8(x[whole * _BITS_PER_BYTE + k] > 0) << np.uint8(k)
        bits[whole] = byte


@njit("void(uint32[::1], uint8[::1])", cache=True)
def _zero_where_clear(g_bits, bits):
    # on the float bits: AND with all ones keeps an element, with zero makes it +0.0 (no
    # branch, so it vectorizes; a float multiply by 0 would give -0.0 for negatives)
    whole = min(bits.size, g_bits.size // _BITS_PER_BYTE)
    for j in range(whole):
        byte = np.uint32(bits[j])
        for k in range(_BITS_PER_BYTE):
            keep = np.uint32(0) - ((byte >> np.uint32(k)) & np.uint32(1))
            g_bits[j * _BITS_PER_BYTE + k] &= keep
    for i in range(whole * _BITS_PER_BYTE, g_bits.size):  # the last, partial byte
        keep = np.uint32(0) - ((np.uint32(bits[whole]) >> np.uint32(i % 8)) & np.uint32(1))
        g_bits[i] &= keep


@njit("void(float32[::1], float32, int8[::1])", cache=True)
def _codes_of(values, inverse_step, codes):
    for i in range(values.size):
        codes[i] = np.int8(values[i] * inverse_step)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A contiguous or channels-last tensor's elements as a 1-d view, in memory order."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if not (t.is_contiguous() or channels_last):
        raise ValueError("a bit mask needs a contiguous or channels-last tensor")
    return t.detach().as_strided((t.numel(),), (1,), t.storage_offset())


def positive_bits(x: torch.Tensor) -> torch.Tensor:
    """uint8 bits of ``x > 0`` for a dense float32 CPU tensor, in its memory order."""
    flat = memory_order(x)
    bits = torch.empty(-(-flat.numel() // _BITS_PER_BYTE), dtype=torch.uint8)
    _pack_positive(flat.numpy(), bits.numpy())
    return bits


def zero_where_clear_(g: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Set ``g`` (dense float32 CPU, stored like the tensor ``bits`` came from) to +0.0
    wherever its bit is clear, in place; returns ``g``."""
    flat = memory_order(g)
    if -(-flat.numel() // _BITS_PER_BYTE) != bits.numel():
        raise ValueError(f"a mask of {bits.numel()} bytes cannot mask {flat.numel()} elements")
    _zero_where_clear(flat.numpy().view(np.uint32), bits.numpy())
    return g


def codes_of_values(values: torch.Tensor, step: float) -> torch.Tensor:
    """int8 codes, stored like ``values`` (contiguous or channels-last float32 CPU), of values
    that are exactly ``code * step`` for a power-of-two ``step``; exact, as ``values / step``."""
    codes = torch.empty_like(values, dtype=torch.int8)
    _codes_of(memory_order(values).numpy(), np.float32(1.0 / step), memory_order(codes).numpy())
    return codes
