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

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from . import _cpu_kernels, _multi_tensor
from .dither import check_dither_size, draw_key, draw_keys, hash_counters, split_key
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
_compile_on_cuda = True


@contextmanager
def torch_backend() -> Iterator[None]:
    """Use the pure-torch paths (the ones CUDA runs) on CPU too, e.g. to check both agree:
    the block-floating-point quantizer's and the low-bit state codec's."""
    global _cpu_kernels_enabled
    previous, _cpu_kernels_enabled = _cpu_kernels_enabled, False
    try:
        yield
    finally:
        _cpu_kernels_enabled = previous


def cpu_kernels_enabled() -> bool:
    """Whether CPU tensors go through the compiled kernels (False inside ``torch_backend()``)."""
    return _cpu_kernels_enabled


def code_dtype(bits: int) -> torch.dtype:
    """Integer dtype that holds b-bit mantissa codes (int8 up to 8 bits, else int16)."""
    return torch.int8 if bits <= 8 else torch.int16


def _flat_float32(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got {x.dtype}")
    return x.detach().to(torch.float32).contiguous().reshape(-1)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d tensor stored only that way, else contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _channels_last_rows(x: torch.Tensor, num_blocks: int) -> tuple[int, int] | None:
    """``(C, H*W)`` when the CPU kernel can quantize ``x`` in its own channels-last memory:
    a 4-d float32 tensor stored channels-last (and not also contiguous) with one exponent.
    The kernel then gives every element the dither of its logical index, so the result is
    the same function; only the memory order is kept."""
    if num_blocks != 1 or x.dtype != torch.float32 or memory_format_of(x) != torch.channels_last:
        return None
    return x.shape[1], x.shape[2] * x.shape[3]


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


def _exponents(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block exponents (int16) and a 0-dim "all finite" flag, with no host sync."""
    keys = _magnitude_keys(blocks.view(torch.int32)).amax(dim=1)
    finite = (keys >= _FLOAT_EXPONENT_ALL_ONES).any().logical_not()
    absmax = keys.view(torch.float32)
    _, exponent = torch.frexp(absmax)
    exps = (exponent.to(torch.int16) - 1).clamp_(EXPONENT_MIN, EXPONENT_MAX)
    return exps.masked_fill_(absmax == 0, EXPONENT_MIN), finite


def _scales(exps: torch.Tensor, bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """float32 (a, b, step) per block: x * a * b is x in steps, step = 2^(e-b+2); all exact."""
    k = bits - 2 - exps.to(device=device, dtype=torch.int64)
    half = torch.div(k, 2, rounding_mode="floor")
    one = torch.ones(k.shape, dtype=torch.float64, device=device)
    return tuple(torch.ldexp(one, p).to(torch.float32) for p in (half, k - half, -k))


def _torch_quantize(
    flat: torch.Tensor,
    block_len: int,
    num_blocks: int,
    bits: int,
    key_words: torch.Tensor,
    mode: int,
    codes: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat codes or values as float32, int16 exponents, finite flag) by torch ops alone."""
    blocks = _padded_blocks(flat, block_len, num_blocks)
    exps, finite = _exponents(blocks)
    scale_a, scale_b, step = _scales(exps, bits, flat.device)
    v = (blocks * scale_a[:, None]) * scale_b[:, None]
    if mode == _cpu_kernels.ROUND_STOCHASTIC:
        counter = torch.arange(blocks.numel(), dtype=torch.int64, device=flat.device)
        hashes = hash_counters(counter.view(blocks.shape), key_words[0], key_words[1])
        floor = torch.floor(v)
        threshold = ((v - floor) * 2.0**32).to(torch.int64)
        v = floor + (hashes < threshold).to(torch.float32)
    elif mode == _cpu_kernels.ROUND_UP:
        v = torch.ceil(v)
    else:
        v = torch.round(v)
    v = v.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    v = torch.where(v == 0, 0.0, v)  # -0.0 -> +0.0 (the compiler drops a `+ 0.0`)
    if not codes:
        v = v * step[:, None]
    return v.reshape(-1)[: flat.numel()], exps, finite


@functools.cache
def _compiled_torch_quantize() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return torch.compile(_torch_quantize, dynamic=True)  # built on first use: importing is slow


def _compiled_quantizer(
    *args: object, mode: int, codes: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_torch_quantize`` fused into a few GPU kernels: one graph per rounding mode and output,
    shapes and bit widths symbolic. The default limit of 8 graphs per function is too few."""
    with torch._dynamo.config.patch(recompile_limit=64):
        return _compiled_torch_quantize()(*args, mode=mode, codes=codes)


def _device_quantize(
    flat: torch.Tensor, block_len: int, num_blocks: int, bits: int, key: int, mode: int, codes: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path: compiled on CUDA when ``torch.compile`` works there, eager otherwise."""
    global _compile_on_cuda
    key_words = torch.tensor(split_key(key), dtype=torch.int64, device=flat.device)
    args = (flat, block_len, num_blocks, bits, key_words)
    if _compile_on_cuda and flat.device.type == "cuda":
        try:
            return _compiled_quantizer(*args, mode=mode, codes=codes)
        except Exception as error:  # no Triton / no compiler: the eager path gives the same codes
            _compile_on_cuda = False
            warnings.warn(
                f"torch.compile of the CUDA quantizer failed ({error!r}); using eager torch ops, "
                "which are correct but several times slower",
                RuntimeWarning,
                stacklevel=2,
            )
    return _torch_quantize(*args, mode=mode, codes=codes)


def _quantize(
    x: torch.Tensor,
    fmt: BlockFloat,
    generator: torch.Generator | None,
    codes: bool,
    in_place: bool = False,
    codes_beside: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes or float32 values shaped like ``x``, exponents) for ``x`` in format ``fmt``;
    ``in_place``: write the values into ``x`` where the CPU kernel can (float32, contiguous);
    ``codes_beside``: an int8 tensor stored like ``x`` that the CPU kernel also writes the
    values' codes into (formats of at most 8 bits)."""
    shape = tuple(x.shape)
    block_len, num_blocks = fmt.block_length(shape), fmt.num_blocks(shape)
    mode = _ROUNDING_MODES[fmt.rounding]
    key = 0
    if mode == _cpu_kernels.ROUND_STOCHASTIC:
        check_dither_size(x.numel())
        key = draw_key(generator)
    out_dtype = code_dtype(fmt.bits) if codes else torch.float32
    on_cpu = _cpu_kernels_enabled and x.device.type == "cpu"
    rows = _channels_last_rows(x, num_blocks) if on_cpu else None
    if rows is not None:  # quantized in memory order, returned channels-last
        flat = x.detach().permute(0, 2, 3, 1).reshape(-1)
        in_place = in_place and not codes and not x.is_inference()
        result = x if in_place else torch.empty_like(x, dtype=out_dtype)
        exps = torch.empty(1, dtype=torch.int16)
        out = result.detach().permute(0, 2, 3, 1).reshape(-1)
        beside = None if codes_beside is None else codes_beside.permute(0, 2, 3, 1).reshape(-1)
        finite = _cpu_kernels.quantize_flat(
            flat, block_len, fmt.bits, mode, split_key(key), codes, out, exps, rows, beside
        )
        if not finite:
            raise ValueError(_NAN_MESSAGE)
        return result, exps
    flat = _flat_float32(x)
    if on_cpu:
        in_place = (
            in_place and not codes and not x.is_inference() and flat.data_ptr() == x.data_ptr()
        )
        result = flat if in_place else torch.empty(flat.numel(), dtype=out_dtype)
        exps = torch.empty(num_blocks, dtype=torch.int16)
        beside = None if codes_beside is None else codes_beside.view(-1)
        finite = _cpu_kernels.quantize_flat(
            flat, block_len, fmt.bits, mode, split_key(key), codes, result, exps, (0, 0), beside
        )
    else:
        result, exps, finite = _device_quantize(
            flat, block_len, num_blocks, fmt.bits, key, mode, codes
        )
        result = result.to(out_dtype)
    if not finite:
        raise ValueError(_NAN_MESSAGE)
    # not a view of the flat buffer: autograd forbids in-place ops (``relu_``) on a custom
    # Function's output that is a view, and the quantizers' outputs are such outputs
    return result.view(shape).detach(), exps


def block_exponents(x: torch.Tensor, fmt: BlockFloat) -> torch.Tensor:
    """Shared exponents ``clamp(floor(log2(max|x|)), -128, 127)`` per block (-128 for all-zero)."""
    shape = tuple(x.shape)
    flat = _flat_float32(x)
    blocks = _padded_blocks(flat, fmt.block_length(shape), fmt.num_blocks(shape))
    exps, finite = _exponents(blocks)
    if not finite:
        raise ValueError(_NAN_MESSAGE)
    return exps.to(torch.int8)


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
    values, _ = _quantize(x, fmt, generator, codes=False, in_place=True)
    if values.data_ptr() != x.data_ptr():
        return x.copy_(values)
    torch.autograd.graph.increment_version(x)  # the kernel wrote x's memory behind autograd
    return x


@torch.no_grad()
def quantize_many_(
    tensors: Iterable[torch.Tensor], fmt: BlockFloat, generator: torch.Generator | None = None
) -> None:
    """``quantize_`` each tensor in place, in one kernel call per pass for all of them
    (parameters, gradients): the same values as quantizing them one after another with the
    same generator, without the per-call overhead. Tensors the CPU kernel cannot take in
    place (other devices, dtypes or layouts) are quantized one by one instead."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not fmt.enabled or not tensors:
        return
    in_place = _cpu_kernels_enabled and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        and not t.is_inference()
        for t in tensors
    )  # fmt: skip
    if not in_place:
        for t in tensors:
            quantize_(t, fmt, generator)
        return
    mode = _ROUNDING_MODES[fmt.rounding]
    for t in tensors:
        check_dither_size(t.numel())
    stochastic = mode == _cpu_kernels.ROUND_STOCHASTIC
    drawn = draw_keys(len(tensors), generator) if stochastic else [0] * len(tensors)
    keys = [split_key(key) for key in drawn]
    block_lens = [fmt.block_length(tuple(t.shape)) for t in tensors]
    flats = [t.view(-1) for t in tensors]
    if not _multi_tensor.quantize_many_flat(flats, block_lens, fmt.bits, mode, keys):
        raise ValueError(_NAN_MESSAGE)
    for t in tensors:
        torch.autograd.graph.increment_version(t)  # the kernel wrote t's memory behind autograd


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
