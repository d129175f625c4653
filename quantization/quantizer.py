"""The block-floating-point quantizer: shared exponents, then rounded, clamped mantissas.

For a block with b-bit mantissas: ``e = clamp(floor(log2(max|x|)), -128, 127)``,
``m = clamp(round(x * 2^(b-2-e)), -2^(b-1), 2^(b-1)-1)`` and the value is ``m * 2^(e-b+2)``.
One refinement keeps quantization idempotent: when the block's largest magnitude is a negative
power of two ``-2^k`` (exactly the code ``-2^(b-1)`` on grid ``e = k-1``), ``e = k-1``; the doc
formula would give ``k`` and re-round the block's odd codes. Fresh float data never hits this.

CPU tensors go through one fused numba kernel; other devices through the same arithmetic in
torch. Both give bit-identical results for the same dither key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _cpu_kernels
from .dither import dither_bits, draw_key, split_key
from .format import EXPONENT_MAX, EXPONENT_MIN, BlockFloat

_FLOAT_EXPONENT_ALL_ONES = 0x7F800000
_ROUNDING_MODES = {
    "nearest": _cpu_kernels.ROUND_NEAREST,
    "stochastic": _cpu_kernels.ROUND_STOCHASTIC,
    "up": _cpu_kernels.ROUND_UP,
}
_NAN_MESSAGE = (
    "cannot quantize a tensor that contains NaN or inf: check the learning rate and the inputs, "
    "or find where the values diverged"
)
_cpu_kernels_enabled = True


@contextmanager
def torch_backend() -> Iterator[None]:
    """Use the pure-torch path (the one CUDA runs) on CPU too, e.g. to check both agree."""
    global _cpu_kernels_enabled
    previous, _cpu_kernels_enabled = _cpu_kernels_enabled, False
    try:
        yield
    finally:
        _cpu_kernels_enabled = previous


def code_dtype(bits: int) -> torch.dtype:
    """Integer dtype that holds b-bit mantissa codes (int8 up to 8 bits, else int16)."""
    return torch.int8 if bits <= 8 else torch.int16


def _flat_float32(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got {x.dtype}")
    return x.detach().to(torch.float32).contiguous().reshape(-1)


def _padded_blocks(flat: torch.Tensor, block_len: int, num_blocks: int) -> torch.Tensor:
    pad = num_blocks * block_len - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(num_blocks, block_len)


def _magnitude_keys(bits: torch.Tensor) -> torch.Tensor:
    """Float bits of |x|, minus one for negative powers of two (see the module docstring)."""
    mag = bits & 0x7FFFFFFF
    negative_power_of_two = (bits < 0) & ((bits & 0x7FFFFF) == 0) & (mag != 0)
    return mag - (negative_power_of_two & (mag < _FLOAT_EXPONENT_ALL_ONES)).to(torch.int32)


def _torch_exponents(flat: torch.Tensor, block_len: int, num_blocks: int) -> torch.Tensor:
    """Per-block exponents (int16) by the torch path; raises on NaN or inf."""
    keys = _magnitude_keys(_padded_blocks(flat, block_len, num_blocks).view(torch.int32))
    keys = keys.amax(dim=1)
    if bool((keys >= _FLOAT_EXPONENT_ALL_ONES).any()):
        raise ValueError(_NAN_MESSAGE)
    absmax = keys.view(torch.float32)
    _, exponent = torch.frexp(absmax)
    exps = (exponent.to(torch.int16) - 1).clamp_(EXPONENT_MIN, EXPONENT_MAX)
    return exps.masked_fill_(absmax == 0, EXPONENT_MIN)


def _scales(exps: torch.Tensor, bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """float32 (a, b, step) per block: x * a * b is x in steps, step = 2^(e-b+2); all exact."""
    k = bits - 2 - exps.to(device=device, dtype=torch.int64)
    half = torch.div(k, 2, rounding_mode="floor")
    one = torch.ones(k.shape, dtype=torch.float64, device=device)
    return tuple(torch.ldexp(one, p).to(torch.float32) for p in (half, k - half, -k))


def _quantize(
    x: torch.Tensor,
    fmt: BlockFloat,
    generator: torch.Generator | None,
    codes: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes or float32 values shaped like ``x``, exponents) for ``x`` in format ``fmt``."""
    shape = tuple(x.shape)
    flat = _flat_float32(x)
    block_len, num_blocks = fmt.block_length(shape), fmt.num_blocks(shape)
    mode = _ROUNDING_MODES[fmt.rounding]
    key = draw_key(generator) if mode == _cpu_kernels.ROUND_STOCHASTIC else 0
    out_dtype = code_dtype(fmt.bits) if codes else torch.float32
    if _cpu_kernels_enabled and flat.device.type == "cpu":
        result = torch.empty(flat.numel(), dtype=out_dtype)
        exps = torch.empty(num_blocks, dtype=torch.int16)
        finite = _cpu_kernels.quantize_flat(
            flat.numpy(),
            block_len,
            fmt.bits,
            mode,
            split_key(key),
            codes,
            result.numpy(),
            exps.numpy(),
        )
        if not finite:
            raise ValueError(_NAN_MESSAGE)
        return result.view(shape), exps
    exps = _torch_exponents(flat, block_len, num_blocks)
    scale_a, scale_b, step = _scales(exps, fmt.bits, flat.device)
    v = (_padded_blocks(flat, block_len, num_blocks) * scale_a[:, None]) * scale_b[:, None]
    if mode == _cpu_kernels.ROUND_STOCHASTIC:
        floor = torch.floor(v)
        threshold = ((v - floor) * 2.0**32).to(torch.int64)
        hashes = _padded_blocks(dither_bits(flat.numel(), key, flat.device), block_len, num_blocks)
        v = floor + (hashes < threshold).to(torch.float32)
    elif mode == _cpu_kernels.ROUND_UP:
        v = torch.ceil(v)
    else:
        v = torch.round(v)
    v = v.clamp_(fmt.code_min, fmt.code_max) + 0.0
    if not codes:
        v = v * step[:, None]
    return v.reshape(-1)[: flat.numel()].to(out_dtype).view(shape), exps


def block_exponents(x: torch.Tensor, fmt: BlockFloat) -> torch.Tensor:
    """Shared exponents ``clamp(floor(log2(max|x|)), -128, 127)`` per block (-128 for all-zero)."""
    shape = tuple(x.shape)
    flat = _flat_float32(x)
    return _torch_exponents(flat, fmt.block_length(shape), fmt.num_blocks(shape)).to(torch.int8)


def quantize(
    x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fake-quantize: return ``x`` rounded onto its block-floating-point grid, same dtype/shape."""
    if not fmt.enabled or x.numel() == 0:
        return x
    values, _ = _quantize(x, fmt, generator, codes=False)
    return values if x.dtype == torch.float32 else values.to(x.dtype)


@torch.no_grad()
def quantize_(
    x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None = None
) -> torch.Tensor:
    """In-place ``quantize`` (weights, gradients, optimizer state); returns ``x``."""
    if not fmt.enabled or x.numel() == 0:
        return x
    values, _ = _quantize(x, fmt, generator, codes=False)  # out of place: aliasing is slow
    return x.copy_(values)


def quantize_codes(
    x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer mantissa codes (x.shape, int8/int16) and int8 exponents, one per block."""
    if not fmt.enabled:
        raise ValueError("a 32-bit (full-precision) format has no integer codes")
    codes, exps = _quantize(x, fmt, generator, codes=True)
    return codes, exps.to(torch.int8)


def dequantize_codes(codes: torch.Tensor, exps: torch.Tensor, fmt: BlockFloat) -> torch.Tensor:
    """float32 values ``m * 2^(e-b+2)`` of integer codes shaped like the original tensor."""
    shape = tuple(codes.shape)
    block_len, num_blocks = fmt.block_length(shape), fmt.num_blocks(shape)
    *_, step = _scales(exps, fmt.bits, codes.device)
    step = step.to(torch.float64)
    flat = codes.reshape(-1).to(torch.float64)
    values = _padded_blocks(flat, block_len, num_blocks) * step[:, None]
    return values.reshape(-1)[: flat.numel()].to(torch.float32).view(shape)
