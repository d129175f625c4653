"""Low-bit optimizer state: code maps with per-block or rank-1 scales (8 and 4 bits).

A state tensor ``x`` is stored as b-bit indices into a code map ``Q`` (2^b sorted values in
[-1, 1] or [0, 1]) plus float32 scales ``s``: ``x ~ Q[i] * s``. Two maps and two
normalizations, after Dettmers et al. (2022, 8-bit optimizers) and Li et al. (2023, 4-bit
optimizer states):

* **dynamic** (dynamic exponent): a sign bit (signed maps), then as many leading zero bits as
  the decimal exponent ``E``, an indicator bit, and the remaining bits as a linear fraction in
  (0.1, 1]: values ``+-10^-E * f``. Its range covers ``b - 1`` decades at 8 bits, so small
  entries of a block keep relative precision. For the first moment (momentum, Adam's m).
* **linear** without zero: ``(k + 1) / 2^b`` for ``k = 0 .. 2^b - 1``. Unsigned, for the second
  moment, which divides the update and must never decode to zero (a zero turns a tiny
  gradient into a step of ``lr * m / eps``).
* **block** normalization: ``s`` is the absolute maximum of each run of ``block_size``
  consecutive elements.
* **rank1** normalization (matrices, conv kernels viewed as ``[out, -1]``): ``s_ij =
  min(max_j |x_ij|, max_i |x_ij|)``, the smaller of the row's and the column's maximum; one
  scale per row plus one per column. Outliers in one row no longer crush a whole block.
  Vectors, and matrices too thin for it to save scales (``RANK1_MIN_VALUES_PER_SCALE``), fall
  back to ``block``.

Rounding is to the nearest code (``stochastic``: to one of the two neighbours with
probability proportional to closeness, unbiased within the map's range). Entries that are
nonzero never decode to zero under the linear map: the smallest code is ``s / 2^b > 0``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .packing import pack_codes, packed_size, unpack_codes

CodeMap = Literal["dynamic", "linear"]
Normalization = Literal["block", "rank1"]
StateRounding = Literal["nearest", "stochastic"]


@dataclass(frozen=True)
class StateFormat:
    """How one optimizer-state tensor is stored: ``bits``-bit codes of ``code_map``, scaled."""

    bits: int = 8
    code_map: CodeMap = "dynamic"
    signed: bool = True
    normalization: Normalization = "block"
    block_size: int = 256
    rounding: StateRounding = "nearest"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not isinstance(self.signed, bool):
            raise TypeError(f"signed must be a bool, got {self.signed!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"low-bit optimizer state has 4 or 8 bits, got {self.bits}")
        if self.code_map not in ("dynamic", "linear"):
            raise ValueError(f"code_map must be 'dynamic' or 'linear', got {self.code_map!r}")
        if self.code_map == "linear" and self.signed:
            raise ValueError("the linear map is unsigned (second moments): set signed=False")
        if self.normalization not in ("block", "rank1"):
            raise ValueError(
                f"normalization must be 'block' or 'rank1', got {self.normalization!r}"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be nearest or stochastic, got {self.rounding!r}")

    @property
    def values(self) -> torch.Tensor:
        """The code map: 2^bits sorted float32 values."""
        return code_map(self.bits, self.code_map, self.signed)

    def describe(self) -> str:
        """Short name, e.g. ``dynamic8/block256`` or ``linear4/rank1``."""
        norm = f"block{self.block_size}" if self.normalization == "block" else "rank1"
        sign = "" if self.signed or self.code_map == "linear" else "u"
        return f"{sign}{self.code_map}{self.bits}/{norm}"


@dataclass(frozen=True)
class LowBitState:
    """The formats of an optimizer's state: first moments (momentum, Adam's m) and second
    moments (Adam's v, which divides the update). ``LowBitState.at(8)`` / ``.at(4)``: the
    defaults measured in the README."""

    first: StateFormat
    second: StateFormat

    @classmethod
    def at(cls, bits: int) -> LowBitState:
        """The defaults at 8 or 4 bits: ``first_moment_format``, ``second_moment_format``."""
        return cls(first_moment_format(bits), second_moment_format(bits))

    @property
    def enabled(self) -> bool:
        """Always True: the state is quantized (a ``BlockFloat`` of 32 bits means float32)."""
        return True

    def describe(self) -> str:
        """E.g. ``m dynamic8/block256, v udynamic8/block256``."""
        return f"m {self.first.describe()}, v {self.second.describe()}"


def first_moment_format(bits: int) -> StateFormat:
    """Momentum and Adam's m: signed dynamic map, blocks of 256 (8 bits) or 128 (4 bits),
    stochastic rounding (unbiased: small momenta are not rounded away step after step)."""
    return StateFormat(bits, "dynamic", True, "block", 256 if bits == 8 else 128, "stochastic")


def second_moment_format(bits: int) -> StateFormat:
    """Adam's v: unsigned dynamic map (no zero: its smallest code is ``10^-(b-1)`` of the
    block's maximum), blocks of 256 (8 bits) or 128 (4 bits), nearest rounding.

    Measured centrally (README, "Optimizer state"), this beat the linear map with rank-1
    scales at 4 bits: the linear map rounds entries below 1/16 of their scale up to it, which
    inflates Adam's denominators, as the BFP state's rounding up did.
    """
    return StateFormat(bits, "dynamic", False, "block", 256 if bits == 8 else 128)


@functools.cache
def code_map(bits: int, kind: CodeMap, signed: bool) -> torch.Tensor:
    """The 2^bits sorted values of a map (see the module docstring); cached, read-only use.

    Dynamic: decade ``E`` (``E`` = 0 .. m - 1, ``m`` magnitude bits) holds ``2^(m - 1 - E)``
    values ``10^-E * f``, ``f`` evenly spaced in (0.1, 1] up to 1; signed maps mirror them and
    add 0. The one code left over halves the top step (most entries of a block are not tiny).
    """
    size = 1 << bits
    if kind == "linear":
        return torch.arange(1, size + 1, dtype=torch.float64).div(size).float()
    magnitude_bits = bits - 1 if signed else bits
    magnitudes: list[float] = []
    for exponent in range(magnitude_bits):
        count = 1 << (magnitude_bits - 1 - exponent)
        fractions = np.linspace(0.1, 1.0, count + 1)[1:]
        magnitudes.extend((fractions * 10.0**-exponent).tolist())
    values = sorted([-m for m in magnitudes] + [0.0] + magnitudes if signed else magnitudes)
    values.append((values[-1] + values[-2]) / 2)
    assert len(values) == size
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class QuantizedState:
    """One state tensor as code-map indices (uint8, 0 .. 2^bits - 1) and float32 scales."""

    indices: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    fmt: StateFormat

    def decode(self) -> torch.Tensor:
        """The float32 tensor: ``Q[indices] * scale``."""
        values = self.fmt.values[self.indices.long()].reshape(-1)
        return (values * _expand_scales(self.scales, self.shape, self.fmt)).reshape(self.shape)

    def to_payload(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices: uint8, packed two a byte at 4 bits; scales: float32)."""
        flat = self.indices.reshape(-1).cpu().numpy().astype(np.int64)
        if self.fmt.bits == 8:
            codes = flat.astype(np.uint8)
        else:
            codes = pack_codes(flat - (1 << (self.fmt.bits - 1)), self.fmt.bits)
        return codes, self.scales.cpu().numpy().astype(np.float32, copy=False)

    @classmethod
    def from_payload(
        cls, codes: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], fmt: StateFormat
    ) -> QuantizedState:
        """Rebuild from ``to_payload`` arrays; raises ``ValueError`` when they do not fit."""
        numel = math.prod(shape)
        want = numel if fmt.bits == 8 else packed_size(numel, fmt.bits)
        if codes.dtype != np.uint8 or codes.size != want:
            raise ValueError(
                f"state codes must be {want} uint8 values, got {codes.size} {codes.dtype}"
            )
        expected_scales = num_scales(shape, fmt)
        if scales.dtype != np.float32 or scales.size != expected_scales:
            raise ValueError(
                f"state scales must be {expected_scales} float32 values, got {scales.size}"
            )
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ValueError("state scales must be finite and >= 0")
        if fmt.bits == 8:
            indices = codes.astype(np.uint8)
        else:
            offset = 1 << (fmt.bits - 1)
            indices = (unpack_codes(codes, fmt.bits, numel).astype(np.int64) + offset).astype(
                np.uint8
            )
        return cls(
            torch.from_numpy(indices.reshape(shape).copy()),
            torch.from_numpy(scales.copy()),
            tuple(shape),
            fmt,
        )

    def nbytes(self) -> int:
        """Bytes of the stored form: packed codes plus float32 scales."""
        return packed_size(math.prod(self.shape), self.fmt.bits) + 4 * self.scales.numel()


def num_scales(shape: tuple[int, ...], fmt: StateFormat) -> int:
    """How many float32 scales a tensor of ``shape`` keeps."""
    numel = math.prod(shape)
    if _rank1(shape, fmt):
        return shape[0] + numel // shape[0]
    return -(-numel // fmt.block_size) if numel else 0


#: Rank-1 scales are used when they number at most one per this many values; a thin matrix
#: (a classifier of 10 rows and 2,000 columns) falls back to blocks, whose scales are fewer.
RANK1_MIN_VALUES_PER_SCALE = 64


def _rank1(shape: tuple[int, ...], fmt: StateFormat) -> bool:
    numel = math.prod(shape)
    if fmt.normalization != "rank1" or len(shape) < 2 or numel == 0:
        return False
    return (shape[0] + numel // shape[0]) * RANK1_MIN_VALUES_PER_SCALE <= numel


def _scales(x: torch.Tensor, fmt: StateFormat) -> torch.Tensor:
    """The float32 scales of ``x`` (row maxima then column maxima, or block maxima)."""
    a = x.detach().abs().float()
    if _rank1(tuple(x.shape), fmt):
        matrix = a.reshape(x.shape[0], -1)
        return torch.cat([matrix.amax(dim=1), matrix.amax(dim=0)])
    flat = a.reshape(-1)
    pad = (-flat.numel()) % fmt.block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, fmt.block_size)
    return blocks.amax(dim=1)


def _expand_scales(scales: torch.Tensor, shape: tuple[int, ...], fmt: StateFormat) -> torch.Tensor:
    """Each element's scale, flat."""
    numel = math.prod(shape)
    if _rank1(shape, fmt):
        rows = shape[0]
        row, col = scales[:rows], scales[rows:]
        return torch.minimum(row[:, None], col[None, :]).reshape(-1)
    return scales.repeat_interleave(fmt.block_size)[:numel]


#: Buckets of the lookup table that finds a value's neighbouring codes: float32 values in
#: order, 2^12 consecutive floats a bucket (a relative width of 2^-11, far below any map's
#: spacing, so a bucket holds at most one code boundary).
_BUCKET_SHIFT = 12
_BUCKET_OFFSET = 1 << (31 - _BUCKET_SHIFT)


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 that orders as the floats do (a negative float's magnitude bits
    flipped); the map is its own inverse."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@functools.cache
def _bucket_table(bits: int, kind: CodeMap, signed: bool) -> torch.Tensor:
    """For each bucket, the index of the largest code at or below the bucket's first value."""
    starts = (torch.arange(2 * _BUCKET_OFFSET, dtype=torch.int32) - _BUCKET_OFFSET) << _BUCKET_SHIFT
    first = _ordered_bits(starts).view(torch.float32).nan_to_num(nan=2.0)
    values = code_map(bits, kind, signed)
    below = torch.searchsorted(values, first, right=True) - 1
    return below.clamp(min=0).to(torch.int16)


def _lower_index(fmt: StateFormat, normalized: torch.Tensor) -> torch.Tensor:
    """Index of the largest code <= each value (0 below the smallest code), vectorized.

    A table lookup on the value's float32 bits, then one comparison with the next code: the
    same answer as ``torch.searchsorted(values, x, right=True) - 1``, at a fraction of its
    cost (searchsorted was 30x the rest of a state update).
    """
    values = fmt.values.to(normalized.device)
    table = _bucket_table(fmt.bits, fmt.code_map, fmt.signed).to(normalized.device)
    bucket = (_ordered_bits(normalized.float()) >> _BUCKET_SHIFT) + _BUCKET_OFFSET
    lower = table[bucket.long()].long()
    nxt = (lower + 1).clamp(max=values.numel() - 1)
    return lower + ((values[nxt] <= normalized) & (nxt > lower)).long()


def quantize_state(
    x: torch.Tensor, fmt: StateFormat, generator: torch.Generator | None = None
) -> QuantizedState:
    """Encode ``x`` (float) in ``fmt``: nearest (or stochastically rounded) code per element."""
    if not fmt.signed and bool((x < 0).any()):
        raise ValueError(f"{fmt.describe()} stores nonnegative values (second moments) only")
    shape = tuple(x.shape)
    scales = _scales(x, fmt)
    per_element = _expand_scales(scales, shape, fmt)
    flat = x.detach().float().reshape(-1)
    safe = torch.where(per_element > 0, per_element, torch.ones_like(per_element))
    normalized = (flat / safe).clamp(-1.0, 1.0)
    values = fmt.values.to(x.device)
    upper = (_lower_index(fmt, normalized) + 1).clamp(1, values.numel() - 1)
    lo, hi = values[upper - 1], values[upper]
    if fmt.rounding == "stochastic":
        u = torch.rand(normalized.shape, generator=generator, device="cpu").to(x.device)
        take_hi = u < ((normalized - lo) / (hi - lo)).clamp(0, 1)
    else:
        take_hi = (hi - normalized) < (normalized - lo)
    indices = torch.where(take_hi, upper, upper - 1)
    return QuantizedState(indices.to(torch.uint8).reshape(shape), scales, shape, fmt)


def quantize_state_(
    x: torch.Tensor, fmt: StateFormat, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Put ``x`` onto its format's grid in place (what the stored codes decode to)."""
    return x.copy_(quantize_state(x, fmt, generator).decode())
