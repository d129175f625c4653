"""Dense bit packing of b-bit two's-complement codes (2 <= b <= 8): 8 codes -> b bytes.

Each group of 8 codes becomes one little-endian 64-bit word ``sum(code_j << (b*j))`` whose low
``b`` bytes are kept, so 4-bit codes pack 2 per byte and 6-bit codes 4 per 3 bytes, vectorized.
"""

from __future__ import annotations

import numpy as np

_GROUP = 8


def packed_size(count: int, bits: int) -> int:
    """Bytes needed to pack ``count`` codes of ``bits`` bits (the last group is padded)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit packing supports 1..8 bits per code, got {bits}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integer codes in [-2^(b-1), 2^(b-1)) into ``packed_size`` uint8 bytes."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    groups = -(-flat.size // _GROUP)
    unsigned = np.zeros(groups * _GROUP, dtype=np.uint64)
    unsigned[: flat.size] = flat.astype(np.int64) & ((1 << bits) - 1)
    shifts = np.arange(_GROUP, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(unsigned.reshape(groups, _GROUP) << shifts, axis=1)
    packed = words.astype("<u8").view(np.uint8).reshape(groups, _GROUP)[:, :bits]
    return packed.reshape(-1)[: packed_size(flat.size, bits)].copy()


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` signed codes (int8) from packed bytes."""
    _check_bits(bits)
    expected = packed_size(count, bits)
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if data.size != expected:
        raise ValueError(
            f"packed buffer holds {data.size} bytes but {count} codes of {bits} bits need "
            f"{expected}: the payload is truncated or padded"
        )
    groups = -(-count // _GROUP)
    padded = np.zeros((groups, _GROUP), dtype=np.uint8)
    buf = np.zeros(groups * bits, dtype=np.uint8)
    buf[:expected] = data
    padded[:, :bits] = buf.reshape(groups, bits)
    words = padded.view("<u8").reshape(groups, 1)
    shifts = np.arange(_GROUP, dtype=np.uint64) * np.uint64(bits)
    unsigned = ((words >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)
    if unsigned[count:].any():  # pack_codes zero-fills: set padding bits mean more codes
        raise ValueError(
            f"packed buffer holds more than {count} codes of {bits} bits (nonzero padding): "
            "the payload does not match the tensor's shape"
        )
    unsigned = unsigned[:count]
    sign = np.int64(1 << (bits - 1))
    return ((unsigned.astype(np.int64) ^ sign) - sign).astype(np.int8)
