"""Integer codes handed from a quantizer to the integer layer that consumes its output.

With ``train.arithmetic=int8`` the activation and error quantizers already compute every
element's integer code; the integer conv and linear layers need exactly those codes. Rather
than re-deriving them from the float values (another quantizer pass, a decode and a
comparison), the quantizer attaches them to the tensor it returns. The consumer takes them only
while they still describe the tensor: same format, same shape, and no in-place change since
(the tensor's version counter). Otherwise it derives the codes itself, so the numbers never
depend on whether the hand-over happened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._saved_kernels import codes_of_values
from .format import BlockFloat
from .quantizer import _quantize, _scales, cpu_kernels_enabled, memory_format_of, quantize

_ATTRIBUTE = "_lowprec_grid_codes"
MAX_CODE_BITS = 8


@dataclass(frozen=True)
class GridCodes:
    """Codes (int8, stored like the values; None until first asked for, when they are
    derived from the values), the one exponent, and what they belong to."""

    codes: torch.Tensor | None
    exponent: torch.Tensor
    fmt: BlockFloat
    version: int


def _single_exponent(x: torch.Tensor, fmt: BlockFloat) -> bool:
    return (
        fmt.enabled
        and fmt.bits <= MAX_CODE_BITS
        and x.dtype == torch.float32
        and x.numel() > 0
        and fmt.num_blocks(tuple(x.shape)) == 1
    )


def _same_grid(a: BlockFloat, b: BlockFloat) -> bool:
    return (a.bits, a.layout, a.block_size) == (b.bits, b.layout, b.block_size)


def values_of_codes(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The float32 values ``code * step`` of one-exponent codes: exact (at most 8-bit codes
    times a power of two), so they equal the quantizer's own output bit for bit."""
    return codes.to(torch.float32).mul_(step)


def quantize_with_codes(
    x: torch.Tensor,
    fmt: BlockFloat,
    generator: torch.Generator | None = None,
    in_place: bool = False,
    lazy: bool = False,
) -> torch.Tensor:
    """``quantize(x, fmt, generator)``, the same values, carrying their int8 codes when
    ``fmt`` gives ``x`` one exponent (values ``code * 2^(e-b+2)``, exact in float32).
    ``in_place``: the values may be written into ``x``'s memory (a tensor the caller owns).
    ``lazy``: the codes are derived from the values when first asked for (``attached_codes``),
    so a tensor nobody asks about never holds them: for outputs whose consumers often need
    only the values (a ReLU's, an error's)."""
    if not _single_exponent(x, fmt):
        return quantize(x, fmt, generator)
    if lazy:
        values, exponent = _quantize(x, fmt, generator, codes=False, in_place=in_place)
        setattr(values, _ATTRIBUTE, GridCodes(None, exponent, fmt, values._version))
        return values
    if x.device.type == "cpu" and cpu_kernels_enabled():  # one pass writes values and codes
        codes = torch.empty_like(x, dtype=torch.int8, memory_format=memory_format_of(x))
        values, exponent = _quantize(
            x, fmt, generator, codes=False, in_place=in_place, codes_beside=codes
        )
    else:
        codes, exponent = _quantize(x, fmt, generator, codes=True)
        *_, step = _scales(exponent, fmt.bits, codes.device)
        values = values_of_codes(codes, step)
    setattr(values, _ATTRIBUTE, GridCodes(codes, exponent, fmt, values._version))
    return values


def attached_codes(
    x: torch.Tensor, fmt: BlockFloat | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes, float32 step) that ``quantize_with_codes`` attached to ``x`` (in a format
    on ``fmt``'s grid, when given), or None when there are none or ``x`` changed since."""
    attached = getattr(x, _ATTRIBUTE, None)
    if (
        not isinstance(attached, GridCodes)
        or (fmt is not None and not _same_grid(attached.fmt, fmt))
        or attached.version != x._version
        or (attached.codes is not None and attached.codes.shape != x.shape)
    ):
        return None
    *_, step = _scales(attached.exponent, attached.fmt.bits, x.device)
    if attached.codes is None:  # derived now, once, from the values
        attached = dataclasses.replace(attached, codes=_codes_of_values(x, step))
        setattr(x, _ATTRIBUTE, attached)
    return attached.codes, step


def _codes_of_values(values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Exact codes ``values / step`` of one-exponent grid values."""
    dense = values.is_contiguous() or values.is_contiguous(memory_format=torch.channels_last)
    if values.device.type == "cpu" and dense:
        return codes_of_values(values, float(step))
    return values.detach().div(step).to(torch.int8)
