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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import _state_kernels
from ._cpu_kernels import _LARGEST_BELOW_TWO_POW_32, _TWO_POW_32
from .dither import check_dither_size, dither_bits, draw_keys, split_key
from .packing import packed_size
from .quantizer import cpu_kernels_enabled

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


@functools.cache
def kernel_values(bits: int, kind: CodeMap, signed: bool) -> torch.Tensor:
    """The map followed by one +inf: the compiled kernels' copy (the sentinel spares their
    neighbour search any clamping, ``_state_kernels._neighbours``)."""
    return torch.cat([code_map(bits, kind, signed), torch.tensor([math.inf])])


@dataclass(frozen=True)
class QuantizedState:
    """One state tensor as packed code-map indices and float32 scales.

    ``codes`` (uint8) are in the wire layout: at 8 bits one index a byte; at 4 bits two a
    byte, low nibble first, each as ``index ^ 8`` (the two's-complement code ``index - 8``
    that ``packing.pack_codes`` writes). What the optimizer keeps between steps.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    fmt: StateFormat

    @property
    def indices(self) -> torch.Tensor:
        """The code-map indices (uint8, 0 .. 2^bits - 1), in ``shape``."""
        return _unpack_indices(self.codes, self.fmt.bits, math.prod(self.shape)).reshape(self.shape)

    def decode(self) -> torch.Tensor:
        """The float32 tensor: ``Q[index] * scale``."""
        return decode_states([self])[0]

    def to_payload(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes: uint8 in the wire layout; scales: float32), as numpy arrays."""
        return self.codes.cpu().numpy(), self.scales.cpu().numpy().astype(np.float32, copy=False)

    @classmethod
    def from_payload(
        cls, codes: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], fmt: StateFormat
    ) -> QuantizedState:
        """Rebuild from ``to_payload`` arrays; raises ``ValueError`` when they do not fit."""
        numel = math.prod(shape)
        want = packed_size(numel, fmt.bits)
        if codes.dtype != np.uint8 or codes.size != want:
            raise ValueError(
                f"state codes must be {want} uint8 values, got {codes.size} {codes.dtype}"
            )
        if fmt.bits == 4 and numel % 2 and int(codes.reshape(-1)[-1]) >> 4:
            raise ValueError("state codes have a nonzero padding nibble: not this tensor's codes")
        expected_scales = num_scales(shape, fmt)
        if scales.dtype != np.float32 or scales.size != expected_scales:
            raise ValueError(
                f"state scales must be {expected_scales} float32 values, got {scales.size}"
            )
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ValueError("state scales must be finite and >= 0")
        return cls(
            torch.from_numpy(codes.reshape(-1).copy()),
            torch.from_numpy(scales.reshape(-1).copy()),
            tuple(shape),
            fmt,
        )

    def clone(self) -> QuantizedState:
        """A copy with its own codes and scales."""
        return QuantizedState(self.codes.clone(), self.scales.clone(), self.shape, self.fmt)

    def nbytes(self) -> int:
        """Bytes of the stored form: packed codes plus float32 scales."""
        return self.codes.numel() + 4 * self.scales.numel()


def _pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 indices -> codes in the wire layout (see ``QuantizedState``)."""
    if bits == 8:
        return indices.to(torch.uint8)
    nibbles = indices.to(torch.uint8) ^ 8
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_indices(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``_pack_indices``: ``numel`` flat uint8 indices."""
    if bits == 8:
        return codes.reshape(-1)[:numel]
    pairs = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:numel]
    return pairs ^ 8


def _kernel_applies(t: torch.Tensor, shape: tuple[int, ...], fmt: StateFormat) -> bool:
    """The compiled kernels handle block-normalized state on the CPU (at 4 bits in blocks of
    even length, so that each block starts on a byte)."""
    even = fmt.bits == 8 or fmt.block_size % 2 == 0
    return t.device.type == "cpu" and even and not _rank1(shape, fmt) and cpu_kernels_enabled()


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


#: The lookup table that finds a value's neighbouring codes. A normalized value lies in
#: [-1, 1]; its float32 magnitude bits give one of ``_BUCKETS_PER_SIGN`` buckets of relative
#: width 2^-8, one run of buckets per sign (``_state_kernels.TINY_BITS`` ...). Each bucket
#: holds at most one code boundary (checked when the table is built), and the table (16 KB)
#: stays in the L1 cache. Magnitudes below 2^-32 share bucket 0.
_TINY_BITS = int(_state_kernels.TINY_BITS)
_ONE_BITS = int(_state_kernels.ONE_BITS)
_BUCKET_SHIFT = int(_state_kernels.BUCKET_SHIFT)
_BUCKETS_PER_SIGN = int(_state_kernels.BUCKETS_PER_SIGN)


def _buckets(x: torch.Tensor) -> torch.Tensor:
    """Each float32 value's bucket (int64): magnitude bucket, plus one run for negatives
    (the sign bit, so -0.0 too)."""
    bits = x.float().contiguous().view(torch.int32)
    magnitude = (bits & 0x7FFFFFFF).clamp(_TINY_BITS, _ONE_BITS) - _TINY_BITS
    return (magnitude >> _BUCKET_SHIFT).long() + (bits < 0).long() * _BUCKETS_PER_SIGN


@functools.cache
def _bucket_table(bits: int, kind: CodeMap, signed: bool) -> torch.Tensor:
    """For each bucket, the index (uint8) of the largest code at or below the bucket's
    smallest value (0 where no code is): for a positive bucket its lower edge, +0.0 for
    bucket 0; for a negative bucket minus its largest magnitude."""
    values = code_map(bits, kind, signed)
    edges = torch.arange(_BUCKETS_PER_SIGN, dtype=torch.int64)
    lower = (edges << _BUCKET_SHIFT) + _TINY_BITS
    upper = torch.minimum(lower + (1 << _BUCKET_SHIFT) - 1, torch.tensor(_ONE_BITS))
    as_float = lambda b: b.to(torch.int32).view(torch.float32)  # noqa: E731
    smallest = torch.cat([as_float(lower).index_fill(0, torch.tensor([0]), 0.0), -as_float(upper)])
    largest = torch.cat([as_float(upper), -as_float(lower).index_fill(0, torch.tensor([0]), 0.0)])
    below = lambda v: (torch.searchsorted(values, v, right=True) - 1).clamp(min=0)  # noqa: E731
    table = below(smallest)
    # -0.0 is the largest value of negative bucket 0; searchsorted sees it as +0.0, which is
    # what the lookup's comparison with the next code finds too
    if int((below(largest) - table).max()) > 1:
        raise AssertionError("a lookup bucket holds two code boundaries: narrow the buckets")
    return table.to(torch.uint8)


def _lower_index(fmt: StateFormat, normalized: torch.Tensor) -> torch.Tensor:
    """Index of the largest code <= each value (0 below the smallest code), vectorized.

    A table lookup on the value's float32 bits, then one comparison with the next code: the
    same answer as ``torch.searchsorted(values, x, right=True) - 1``, at a fraction of its
    cost (searchsorted was 30x the rest of a state update).
    """
    values = fmt.values.to(normalized.device)
    table = _bucket_table(fmt.bits, fmt.code_map, fmt.signed).to(normalized.device)
    lower = table[_buckets(normalized)].long()
    nxt = (lower + 1).clamp(max=values.numel() - 1)
    return lower + ((values[nxt] <= normalized) & (nxt > lower)).long()


def quantize_state(
    x: torch.Tensor, fmt: StateFormat, generator: torch.Generator | None = None
) -> QuantizedState:
    """Encode ``x`` (float) in ``fmt``: nearest (or stochastically rounded) code per element.

    With ``x`` normalized by its scale, ``n = clamp(x / s, -1, 1)``, between neighbouring codes
    ``lo <= n < hi``: nearest picks the closer one; stochastic picks ``hi`` with probability
    ``p = (n - lo) / (hi - lo)`` (to 2^-32: ``hash(i) < floor(p * 2^32)`` with the counter
    hash of ``dither.py`` under a key drawn from ``generator``), so ``E[decode] = x`` within
    the map's range. Raises ``ValueError`` for NaN or inf, and for negative values under an
    unsigned map.
    """
    return quantize_states([x], [fmt], generator)[0]


def quantize_states(
    tensors: Sequence[torch.Tensor],
    fmts: Sequence[StateFormat],
    generator: torch.Generator | None = None,
) -> list[QuantizedState]:
    """``quantize_state`` of each tensor in its format, bit for bit: the keys of stochastic
    formats are drawn from ``generator`` in the same order. Those the compiled kernels cover
    are encoded in one call (an optimizer step's state: one call, not one per tensor), their
    codes and scales views of one buffer each."""
    flats = []
    for x in tensors:
        flat = x.detach().float().reshape(-1).contiguous()
        check_dither_size(flat.numel())
        flats.append(flat)
    drawn = iter(draw_keys(sum(f.rounding == "stochastic" for f in fmts), generator))
    keys = [next(drawn) if f.rounding == "stochastic" else 0 for f in fmts]
    shapes = [tuple(x.shape) for x in tensors]
    kernel = [i for i, flat in enumerate(flats) if _kernel_applies(flat, shapes[i], fmts[i])]
    states: list[QuantizedState | None] = [None] * len(flats)
    if kernel:
        codes = _views(torch.uint8, [packed_size(flats[i].numel(), fmts[i].bits) for i in kernel])
        scales = _views(torch.float32, [num_scales(shapes[i], fmts[i]) for i in kernel])
        layouts = [
            _layout(flats[i], c, s, fmts[i], split_key(keys[i]))
            for i, c, s in zip(kernel, codes, scales, strict=True)
        ]
        if _state_kernels.encode_many(layouts) == _state_kernels.STATE_OK:
            for i, c, s in zip(kernel, codes, scales, strict=True):
                states[i] = QuantizedState(c, s, shapes[i], fmts[i])
    for i, state in enumerate(states):  # the rest, and a failed call: the torch path raises
        if state is None:
            states[i] = _encode_torch(flats[i], shapes[i], fmts[i], keys[i])
    return states  # type: ignore[return-value]


def decode_states(states: Sequence[QuantizedState]) -> list[torch.Tensor]:
    """Each state's float32 tensor, ``Q[index] * scale``; those the compiled kernels cover in
    one call, as views of one buffer."""
    kernel = [i for i, q in enumerate(states) if _kernel_applies(q.codes, q.shape, q.fmt)]
    out: list[torch.Tensor | None] = [None] * len(states)
    if kernel:
        flats = _views(torch.float32, [math.prod(states[i].shape) for i in kernel])
        layouts = []
        for i, flat in zip(kernel, flats, strict=True):
            q = states[i]
            layouts.append(_layout(flat, q.codes.contiguous(), q.scales.contiguous(), q.fmt, None))
            out[i] = flat.view(q.shape)
        _state_kernels.decode_many(layouts)
    for i, q in enumerate(states):
        if out[i] is None:
            values = q.fmt.values.to(q.codes.device)[q.indices.long()].reshape(-1)
            out[i] = (values * _expand_scales(q.scales, q.shape, q.fmt)).reshape(q.shape)
    return out  # type: ignore[return-value]


class StateArena:
    """The low-bit state of a fixed list of CPU tensors (shapes and formats), its codes in one
    buffer and its scales in another, with the kernel table built once.

    An optimizer's state has the same tensors every step; with the table kept, encoding and
    decoding all of it is one kernel call each and almost no Python per tensor. ``encode``
    rewrites ``states`` in place, as torch's optimizers update their state tensors in place;
    copy a state (``QuantizedState.clone``) to keep it. Results equal ``quantize_states``'
    bit for bit, keys drawn in the same order.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], fmts: Sequence[StateFormat]) -> None:
        self.fmts = list(fmts)
        self.shapes = [tuple(x.shape) for x in tensors]
        self._numels = [math.prod(shape) for shape in self.shapes]
        codes = _views(
            torch.uint8, [packed_size(n, f.bits) for n, f in zip(self._numels, fmts, strict=True)]
        )
        scales = _views(
            torch.float32, [num_scales(sh, f) for sh, f in zip(self.shapes, fmts, strict=True)]
        )
        self.states = [
            QuantizedState(c, sc, shape, fmt)
            for c, sc, shape, fmt in zip(codes, scales, self.shapes, fmts, strict=True)
        ]
        self._stochastic = [i for i, f in enumerate(fmts) if f.rounding == "stochastic"]
        self._decoded: list[torch.Tensor] | None = None
        self._plan = _state_kernels.Plan(
            [
                _layout(x, q.codes, q.scales, q.fmt, (0, 0))
                for x, q in zip(tensors, self.states, strict=True)
            ]
        )

    @classmethod
    def covering(
        cls, tensors: Sequence[torch.Tensor], fmts: Sequence[StateFormat]
    ) -> StateArena | None:
        """An arena for these tensors, or None unless the compiled kernels cover them all."""
        if not tensors or not all(_arena_tensor(x, f) for x, f in zip(tensors, fmts, strict=True)):
            return None
        return cls(tensors, fmts)

    def fits(self, tensors: Sequence[torch.Tensor], fmts: Sequence[StateFormat]) -> bool:
        """Whether ``encode`` takes these tensors: the same shapes and formats, and each one
        contiguous float32 on the CPU (at once when they are ``decode``'s tensors, which
        torch's optimizers update in place)."""
        if list(fmts) != self.fmts or len(tensors) != len(self.shapes):
            return False
        decoded = self._decoded
        if decoded is not None and all(a is b for a, b in zip(tensors, decoded, strict=True)):
            return True
        return all(
            tuple(x.shape) == shape and _arena_tensor(x, f)
            for x, shape, f in zip(tensors, self.shapes, fmts, strict=True)
        )

    def holds(self, states: Sequence[QuantizedState]) -> bool:
        """Whether ``states`` are this arena's, in order (what ``decode`` decodes)."""
        return len(states) == len(self.states) and all(
            a is b for a, b in zip(states, self.states, strict=True)
        )

    def encode(
        self, tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[QuantizedState]:
        """Encode ``tensors`` (``fits``) into ``states``, one kernel call; raises as
        ``quantize_state`` does, leaving ``states`` partly written."""
        self._decoded = None  # not kept: the float32 state goes once it is encoded
        if len(tensors) != len(self.shapes):  # the table's other rows would read stale memory
            raise ValueError(f"this arena encodes {len(self.shapes)} tensors, got {len(tensors)}")
        for i, x in enumerate(tensors):
            self._plan.set_x(i, x.data_ptr())
        for i, key in zip(
            self._stochastic, draw_keys(len(self._stochastic), generator), strict=True
        ):
            self._plan.set_key(i, split_key(key))
        status = self._plan.run(decode=False)
        if status != _state_kernels.STATE_OK:
            for x, fmt in zip(tensors, self.fmts, strict=True):
                _check_values(x.reshape(-1), fmt)  # names the format
            _raise_for(status, self.fmts[0])
        return self.states

    def decode(self) -> list[torch.Tensor]:
        """``states``' float32 tensors, views of one new buffer, one kernel call."""
        flats = _views(torch.float32, self._numels)
        for i, flat in enumerate(flats):
            self._plan.set_x(i, flat.data_ptr())
        self._plan.run(decode=True)
        self._decoded = [flat.view(shape) for flat, shape in zip(flats, self.shapes, strict=True)]
        return self._decoded


def _arena_tensor(x: torch.Tensor, fmt: StateFormat) -> bool:
    shape = tuple(x.shape)
    return (
        x.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() > 0
        and _kernel_applies(x, shape, fmt)
    )


def _views(dtype: torch.dtype, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Consecutive 1-d views of one new buffer, of the given sizes."""
    return torch.empty(sum(sizes), dtype=dtype).split(sizes)


def _layout(
    flat: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: StateFormat,
    key: tuple[int, int] | None,
) -> _state_kernels.Layout:
    table = _bucket_table(fmt.bits, fmt.code_map, fmt.signed)
    values = kernel_values(fmt.bits, fmt.code_map, fmt.signed)
    stochastic = key if fmt.rounding == "stochastic" else None
    return _state_kernels.Layout(
        flat, codes, scales, values, table, fmt.block_size, fmt.bits, fmt.signed, stochastic
    )


def _encode_torch(
    flat: torch.Tensor, shape: tuple[int, ...], fmt: StateFormat, key: int
) -> QuantizedState:
    """The vectorized torch path of ``quantize_state`` (any device, rank-1 scales)."""
    _check_values(flat, fmt)
    scales = _scales(flat.reshape(shape), fmt)
    per_element = _expand_scales(scales, shape, fmt)
    safe = torch.where(per_element > 0, per_element, torch.ones_like(per_element))
    normalized = (flat / safe).clamp(-1.0, 1.0)
    values = fmt.values.to(flat.device)
    upper = (_lower_index(fmt, normalized) + 1).clamp(1, values.numel() - 1)
    lo, hi = values[upper - 1], values[upper]
    if fmt.rounding == "stochastic":
        p = ((normalized - lo) / (hi - lo)).clamp(0, 1)
        threshold = (p * float(_TWO_POW_32)).clamp(max=float(_LARGEST_BELOW_TWO_POW_32))
        threshold = threshold.to(torch.int64)
        take_hi = dither_bits(flat.numel(), key, flat.device) < threshold
    else:
        take_hi = (hi - normalized) < (normalized - lo)
    indices = torch.where(take_hi, upper, upper - 1)
    return QuantizedState(_pack_indices(indices, fmt.bits), scales, shape, fmt)


def _check_values(flat: torch.Tensor, fmt: StateFormat) -> None:
    """Raise the ``quantize_state`` error for values ``fmt`` cannot store."""
    if not bool(torch.isfinite(flat).all()):
        _raise_for(_state_kernels.STATE_NOT_FINITE, fmt)
    if not fmt.signed and bool((flat < 0).any()):
        _raise_for(_state_kernels.STATE_NEGATIVE, fmt)


def _raise_for(status: int, fmt: StateFormat) -> None:
    if status == _state_kernels.STATE_NOT_FINITE:
        raise ValueError(
            "optimizer state holds NaN or inf: check the learning rate and the inputs, or find "
            "where the values diverged"
        )
    if status == _state_kernels.STATE_NEGATIVE:
        raise ValueError(f"{fmt.describe()} stores nonnegative values (second moments) only")
