"""Counter-based dither for stochastic rounding: one hash per element, no RNG state per element.

Stochastic rounding needs one uniform number per element. Generating them with a stateful RNG
(``torch.rand``) costs more than the rest of the quantizer together. Here element ``i`` of a call
with 64-bit key ``k`` gets ``h = mix(mix(i ^ k_lo) ^ k_hi)`` where ``mix`` is a bijective 32-bit
integer hash (Wellons' "lowbias32" family). For one key the map ``i -> h`` is a bijection on
[0, 2^32); rounding ``v`` up when ``h < floor(frac(v) * 2^32)`` is unbiased to within 2^-32 of
a step - finer than ``torch.rand``'s 2^-24 grid. Keys come from a seeded ``torch.Generator``, so
results are reproducible and independent of thread count and device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
INV_2_POW_32 = 2.0**-32
MAX_ELEMENTS = 1 << 32


def draw_key(generator: torch.Generator | None = None) -> int:
    """Draw a fresh 62-bit dither key from ``generator`` (torch's default generator if None)."""
    return int(torch.randint(0, 1 << 62, (), generator=generator, dtype=torch.int64))


def draw_keys(count: int, generator: torch.Generator | None = None) -> list[int]:
    """``count`` keys, the same as ``count`` calls of ``draw_key`` in a row (torch's CPU
    generator fills a small tensor element by element, in order; tested), in one call: a
    training step draws one key a tensor, some 40 of them."""
    if count == 0:
        return []
    return torch.randint(0, 1 << 62, (count,), generator=generator, dtype=torch.int64).tolist()


def split_key(key: int) -> tuple[int, int]:
    """Split a dither key into the two 32-bit words the hash consumes."""
    return key & MASK32, (key >> 32) & MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit avalanche hash on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * MIX_MUL_1) & MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_MUL_2) & MASK32
    return h ^ (h >> 15)


def hash_counters(
    counter: torch.Tensor, k1: int | torch.Tensor, k2: int | torch.Tensor
) -> torch.Tensor:
    """The 32-bit hashes (int64) of element counters under the key words ``(k1, k2)``."""
    return _mix32(_mix32(counter ^ k1) ^ k2)


def dither_bits(n: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n`` 32-bit hashes (int64 tensor) stochastic rounding compares against under ``key``."""
    check_dither_size(n)
    return hash_counters(torch.arange(n, dtype=torch.int64, device=device), *split_key(key))


def check_dither_size(n: int) -> None:
    """Raise if one call would need more counters than the 32-bit hash has."""
    if n > MAX_ELEMENTS:
        raise ValueError(f"stochastic rounding supports at most 2^32 elements per call, got {n}")


def uniform_dither(n: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The same hashes as float64 uniforms in [0, 1): ``dither_bits / 2^32``."""
    return dither_bits(n, key, device).to(torch.float64) * INV_2_POW_32
