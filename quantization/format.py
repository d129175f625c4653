"""The block-floating-point number format: bits, block layout and rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Layout = Literal["tensor", "channel", "kernel", "block", "auto"]
Rounding = Literal["stochastic", "nearest", "up"]

LAYOUTS: tuple[str, ...] = ("tensor", "channel", "kernel", "block", "auto")
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest", "up")
FULL_PRECISION_BITS = 32
MAX_QUANTIZED_BITS = 16
EXPONENT_MIN, EXPONENT_MAX = -128, 127


@dataclass(frozen=True)
class BlockFloat:
    """A block-floating-point format: b-bit mantissas sharing one exponent per block.

    ``bits`` counts the mantissa's sign bit; 2..16 quantize and 32 means "off" (float32).
    ``layout`` picks the blocks: ``tensor`` (one exponent), ``channel`` (one per slice of dim 0),
    ``kernel`` (one per (out, in) pair of a conv weight; per row for matrices, as ``channel``),
    ``block`` (runs of ``block_size`` consecutive elements; 32 at 8 bits is OCP MXINT8) and
    ``auto`` (``kernel`` for conv weights, ``channel`` for matrices, ``tensor`` otherwise).
    ``rounding`` is ``stochastic`` (unbiased), ``nearest`` (ties to even) or ``up`` (ceiling, then
    clamped to the largest code; for quantities that must not round to zero, like Adam's second
    moment).
    """

    bits: int = 8
    layout: Layout = "tensor"
    rounding: Rounding = "stochastic"
    block_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not (2 <= self.bits <= MAX_QUANTIZED_BITS or self.bits == FULL_PRECISION_BITS):
            raise ValueError(
                f"bits={self.bits} is not supported: use 2..{MAX_QUANTIZED_BITS} for block "
                f"floating point or {FULL_PRECISION_BITS} for full precision (no quantization)"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"unknown rounding {self.rounding!r}: choose one of {', '.join(ROUNDINGS)}"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def enabled(self) -> bool:
        """Whether this format quantizes at all (False for 32-bit full precision)."""
        return self.bits < FULL_PRECISION_BITS

    @property
    def code_min(self) -> int:
        """Smallest mantissa code, -2^(b-1)."""
        return -(1 << (self.bits - 1))

    @property
    def code_max(self) -> int:
        """Largest mantissa code, 2^(b-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    def block_length(self, shape: tuple[int, ...]) -> int:
        """Number of consecutive (row-major) elements that share one exponent."""
        numel = math.prod(shape)
        layout = self.resolved_layout(shape)
        if numel == 0:
            return 1
        if layout == "tensor":
            return numel
        if layout == "channel":
            return numel // shape[0]
        if layout == "kernel":
            return numel // (shape[0] * shape[1]) if len(shape) >= 3 else numel // shape[0]
        return self.block_size

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        """Number of shared exponents a tensor of this shape needs."""
        numel = math.prod(shape)
        return -(-numel // self.block_length(shape))

    def resolved_layout(self, shape: tuple[int, ...]) -> str:
        """The concrete layout used for a tensor of this shape (resolves ``auto`` and scalars)."""
        layout = self.layout
        if layout == "auto":
            layout = "kernel" if len(shape) >= 3 else "channel" if len(shape) == 2 else "tensor"
        if layout in ("channel", "kernel") and len(shape) < 2:
            return "tensor"
        return layout

    def describe(self) -> str:
        """Short human-readable name, e.g. ``bfp8/tensor/stochastic``."""
        if not self.enabled:
            return "fp32"
        layout = f"block{self.block_size}" if self.layout == "block" else self.layout
        return f"bfp{self.bits}/{layout}/{self.rounding}"


FP32 = BlockFloat(bits=FULL_PRECISION_BITS)
