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

from dataclasses import dataclass

import torch

from .format import BlockFloat
from .quantizer import _quantize, _scales, cpu_kernels_enabled, memory_format_of, quantize

_ATTRIBUTE = "_lowprec_grid_codes"
MAX_CODE_BITS = 8


@dataclass(frozen=True)
class GridCodes:
    """Codes (int8, stored like the values), the one exponent, and what they belong to."""

    codes: torch.Tensor
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
    x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``quantize(x, fmt, generator)``, the same values, carrying their int8 codes when
    ``fmt`` gives ``x`` one exponent (values ``code * 2^(e-b+2)``, exact in float32)."""
    if not _single_exponent(x, fmt):
        return quantize(x, fmt, generator)
    if x.device.type == "cpu" and cpu_kernels_enabled():  # one pass writes values and codes
        codes = torch.empty_like(x, dtype=torch.int8, memory_format=memory_format_of(x))
        values, exponent = _quantize(x, fmt, generator, codes=False, codes_beside=codes)
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
        or attached.codes.shape != x.shape
    ):
        return None
    *_, step = _scales(attached.exponent, attached.fmt.bits, attached.codes.device)
    return attached.codes, step
