"""Integer products of training: int8 x int8 -> int32, then one power-of-two scale.

A block-floating-point value is ``code * step`` with ``step = 2^(e - b + 2)``. A product that
reduces over a dimension along which both operands' steps are constant is therefore an integer
product times one scale:

    sum_k (a_k * s_a)(b_k * s_b) = s_a * s_b * sum_k a_k * b_k

and the integer sum is exact in int32 (|code| <= 128, so up to 2^17 terms). The float32
fake-quant path computes the same sum with float32 rounding at every partial sum; where those
partial sums stay below 2^24 steps it is exact too, and the two paths agree bit for bit.

Which steps are constant where, for a layer ``y = x * w`` (conv or matmul):
- activations ``x`` and errors ``dy`` have one exponent per tensor (the reference layout);
- weights have one exponent per output channel (layout ``channel``) or per tensor. Both keep
  the forward product (over input channels and taps) and grad-weight (over batch and pixels,
  weights not involved) single integer products.
- grad-input reduces over *output* channels, along which per-channel steps vary. It is done as
  one integer product per distinct exponent over the channels that share it, summed in float32:
  exact per group, and a trained layer's channels hold a handful of distinct exponents.

Routes, each measured against the float32 op it replaces (``benchmarks.integer_ops``):
- conv forward and conv grad-input: oneDNN's int8 convolution (``torch.ops.onednn``; uint8
  input with zero point 128, int8 weights, float32 output); grad-input convolves the errors with
  the flipped, transposed weights, so it needs stride 1;
- conv grad-weight, stride 1: one ``torch._int_mm`` per kernel tap on channels-last padded
  grids, flattened. With both grids padded alike, the input pixel under tap ``(i, j)`` of
  output pixel ``p`` is ``p + d_h*i*W_p + d_w*j`` in the flat index, so each tap's operands are
  plain row slices of two matrices and no im2col gather is materialised;
- linear: ``torch._int_mm`` for all three products.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .format import BlockFloat
from .quantizer import _scales, quantize_codes

#: The zero point that makes int8 codes the uint8 activations oneDNN takes: ``c ^ 0x80 = c+128``.
_ZERO_POINT = 128
MAX_INTEGER_BITS = 8


@dataclass(frozen=True)
class Codes:
    """A tensor as int8 codes and float32 steps: one step, or one per output channel (dim 0)."""

    codes: torch.Tensor
    steps: torch.Tensor

    @property
    def step(self) -> float:
        """The single step of a per-tensor code (activations, errors)."""
        return float(self.steps.reshape(-1)[0])

    def channel_steps(self) -> torch.Tensor:
        """One step per slice of dim 0 (a per-tensor step repeated)."""
        return self.steps.expand(self.codes.shape[0]) if self.steps.numel() == 1 else self.steps

    def decode(self) -> torch.Tensor:
        """The float32 values ``code * step``."""
        view = self.steps.reshape(-1, *([1] * (self.codes.dim() - 1)))
        return self.codes.to(torch.float32) * view


def integer_layout_problem(
    fmt: BlockFloat, shape: tuple[int, ...], per_channel: bool
) -> str | None:
    """Why values of ``fmt`` and ``shape`` have no integer product, or None when they have one:
    codes of 8 bits or fewer, one exponent for the whole tensor or (``per_channel``, weights)
    one per slice of dim 0."""
    if not fmt.enabled or fmt.bits > MAX_INTEGER_BITS:
        return f"{fmt.describe()} is not a format of {MAX_INTEGER_BITS} bits or fewer"
    blocks = fmt.num_blocks(shape)
    one_per_row = len(shape) >= 2 and fmt.block_length(shape) * shape[0] == math.prod(shape)
    if blocks == 1 or (per_channel and one_per_row):
        return None
    unit = "output channel" if per_channel else "tensor"
    return f"{fmt.describe()} keeps {blocks} exponents, more than one per {unit}"


def codes_on_grid(x: torch.Tensor, fmt: BlockFloat) -> Codes | None:
    """``x`` as codes of ``fmt`` (one exponent, or one per slice of dim 0), or None when ``x``
    is not exactly on that grid (then no integer product computes the same function)."""
    codes, exponents = quantize_codes(x, dataclasses.replace(fmt, rounding="nearest"))
    *_, steps = _scales(exponents, fmt.bits, codes.device)  # the quantizer's own 2^(e-b+2)
    result = Codes(codes.to(torch.int8), steps)
    if not torch.equal(result.decode(), x.detach().to(torch.float32)):
        return None
    return result


def _as_uint8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes as oneDNN's uint8 with zero point 128 (``c ^ 0x80``), channels-last."""
    return codes.view(torch.uint8).bitwise_xor(0x80).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-d convolution's stride, padding and dilation (groups 1, zero padding)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def unit_stride(self) -> bool:
        """Whether both backward products have integer routes (they need stride 1)."""
        return self.stride == (1, 1)


def _onednn_conv(
    x_codes: torch.Tensor,
    x_step: float,
    w_codes: torch.Tensor,
    w_steps: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """float32 ``conv2d(x, w) + bias`` of codes by oneDNN's int8 convolution (channels-last)."""
    onednn = torch.ops.onednn
    xu = _as_uint8(x_codes)
    w_steps = w_steps.to(torch.float32).contiguous()
    zero_points = torch.zeros(w_codes.shape[0], dtype=torch.int64)
    packed = onednn.qconv_prepack(
        w_codes, w_steps, x_step, _ZERO_POINT, stride, padding, dilation, 1, tuple(xu.shape)
    )
    return onednn.qconv2d_pointwise(
        xu, x_step, _ZERO_POINT, packed, w_steps, zero_points, bias, stride, padding, dilation,
        1, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def conv2d_forward(
    x: Codes, w: Codes, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """``conv2d(x, w) + bias`` as one int8 convolution; ``w`` per output channel or tensor."""
    return _onednn_conv(
        x.codes, x.step, w.codes, w.channel_steps(), bias, geometry.stride, geometry.padding,
        geometry.dilation,
    )  # fmt: skip


def _exponent_groups(w: Codes) -> list[tuple[float, torch.Tensor | None]]:
    """(step, output channels) per distinct weight step; channels None when one covers all."""
    distinct, inverse = torch.unique(w.channel_steps(), return_inverse=True)
    if distinct.numel() == 1:
        return [(float(distinct[0]), None)]
    return [(float(step), (inverse == k).nonzero().reshape(-1)) for k, step in enumerate(distinct)]


def conv2d_grad_input(
    dy: Codes, w: Codes, input_shape: torch.Size, geometry: ConvGeometry
) -> torch.Tensor:
    """``dL/dx`` of a stride-1 conv: ``conv2d(dy, flip(w)^T)`` with padding ``d(k-1) - p``,
    one int8 convolution per distinct weight exponent (see the module docstring)."""
    kernel = w.codes.shape[2:]
    padding = tuple(
        d * (k - 1) - p for d, k, p in zip(geometry.dilation, kernel, geometry.padding, strict=True)
    )
    flipped = w.codes.flip(2, 3).transpose(0, 1)  # (in, out, kh, kw)
    grad: torch.Tensor | None = None
    for step, channels in _exponent_groups(w):
        w_part = flipped if channels is None else flipped.index_select(1, channels)
        dy_part = dy.codes if channels is None else dy.codes.index_select(1, channels)
        steps = torch.full((w_part.shape[0],), step)
        part = _onednn_conv(
            dy_part, dy.step, w_part.contiguous(), steps, None, (1, 1), padding,
            geometry.dilation,
        )  # fmt: skip
        grad = part if grad is None else grad.add_(part)
    assert grad is not None and grad.shape == input_shape, (grad, input_shape)
    return grad


def _row_major(m: torch.Tensor) -> torch.Tensor:
    """``m`` itself when rows are unit-stride and apart by at least a row (what ``_int_mm``
    reads correctly; a transposed view with a size-1 dim is not), else a row-major copy."""
    if m.stride(1) == 1 and m.stride(0) >= max(m.shape[1], 1):
        return m
    return torch.empty(m.shape, dtype=m.dtype).copy_(m)


def _int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int8 x int8 -> int32 matrix product."""
    a, b = _row_major(a), _row_major(b)
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def conv2d_grad_weight(
    dy: Codes, x: Codes, weight_shape: torch.Size, geometry: ConvGeometry
) -> torch.Tensor:
    """``dL/dw`` of a stride-1 conv: one ``_int_mm`` per tap on flat padded grids, so
    ``dw[:, :, i, j] = dy_grid^T[:, :L-s] @ x_grid[s:]`` with ``s = d_h*i*W_p + d_w*j``."""
    n, c_in, h, w = x.codes.shape
    c_out, _, k_h, k_w = weight_shape
    (p_h, p_w), (d_h, d_w) = geometry.padding, geometry.dilation
    h_p, w_p = h + 2 * p_h, w + 2 * p_w
    h_o, w_o = dy.codes.shape[2:]
    x_grid = x.codes.new_zeros(n, h_p, w_p, c_in)
    x_grid[:, p_h : p_h + h, p_w : p_w + w] = x.codes.permute(0, 2, 3, 1)
    dy_grid = dy.codes.new_zeros(c_out, n, h_p, w_p)
    dy_grid[:, :, :h_o, :w_o] = dy.codes.permute(1, 0, 2, 3)
    length = n * h_p * w_p
    x_rows, dy_cols = x_grid.view(length, c_in), dy_grid.view(c_out, length)
    taps = torch.empty(k_h, k_w, c_out, c_in, dtype=torch.int32)
    for i in range(k_h):
        for j in range(k_w):
            shift = d_h * i * w_p + d_w * j
            _int_mm(dy_cols[:, : length - shift], x_rows[shift:], out=taps[i, j])
    return taps.permute(2, 3, 0, 1).to(torch.float32).mul_(dy.step * x.step)


def linear_forward(x: Codes, w: Codes, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w^T + bias`` as one ``_int_mm``; ``x`` is (rows, in), ``w`` (out, in)."""
    y = _int_mm(x.codes, w.codes.t()).to(torch.float32)
    y.mul_(w.steps.reshape(1, -1) * x.step)
    return y if bias is None else y.add_(bias)


def linear_grad_input(dy: Codes, w: Codes) -> torch.Tensor:
    """``dL/dx = dy @ w``: one ``_int_mm`` per distinct weight exponent (over its rows)."""
    grad: torch.Tensor | None = None
    for step, rows in _exponent_groups(w):
        dy_part = dy.codes if rows is None else dy.codes.index_select(1, rows)
        w_part = w.codes if rows is None else w.codes.index_select(0, rows)
        part = _int_mm(dy_part, w_part).to(torch.float32).mul_(dy.step * step)
        grad = part if grad is None else grad.add_(part)
    assert grad is not None
    return grad


def linear_grad_weight(dy: Codes, x: Codes) -> torch.Tensor:
    """``dL/dw = dy^T @ x`` as one ``_int_mm``."""
    return _int_mm(dy.codes.t(), x.codes).to(torch.float32).mul_(dy.step * x.step)


#: x86 CPU features with int8 dot-product instructions; without one, oneDNN's int8 kernels run
#: a reference implementation (measured on an AVX2-only AMD EPYC, 2026-12-04: ``torch._int_mm``
#: of (37k x 128) @ (128 x 128) took 629 ms against 29 ms for the float32 matmul).
INT8_DOT_PRODUCT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def int8_products_problem() -> str | None:
    """None when this CPU has fast int8 products, else why not: on x86 it needs VNNI or AMX
    (``INT8_DOT_PRODUCT_FEATURES``). Other architectures are not gated (not measured)."""
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("architecture") != "x86_64":
        return None
    if any(capabilities.get(feature, False) for feature in INT8_DOT_PRODUCT_FEATURES):
        return None
    name = capabilities.get("cpu_name") or "this CPU"
    return (
        f"{name} has no int8 dot-product instructions ({', '.join(INT8_DOT_PRODUCT_FEATURES)}): "
        "int8 products would run oneDNN's reference kernels, about 20x slower than float32"
    )


@functools.cache
def onednn_int8_conv_exact() -> str | None:
    """None when oneDNN's int8 convolution is present and exact here, else why not.

    CPUs without VNNI (AVX2-only) may compute u8 x s8 pairs in saturating int16; this checks
    the extreme codes once (all products -128 * 127, stride 1 and 2) against an exact sum."""
    if not (
        hasattr(torch.ops.onednn, "qconv2d_pointwise")
        and hasattr(torch.ops.onednn, "qconv_prepack")
    ):
        return (
            "this torch build has no oneDNN int8 convolution (torch.ops.onednn.qconv2d_pointwise)"
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, 16, 9, 9), dtype=torch.int8, generator=generator)
    x[0] = 127
    w = torch.randint(-128, 128, (8, 16, 3, 3), dtype=torch.int8, generator=generator)
    w[0] = -128
    try:
        for stride in ((1, 1), (2, 2)):
            got = _onednn_conv(x, 1.0, w, torch.ones(8), None, stride, (1, 1), (1, 1))
            want = torch.nn.functional.conv2d(
                x.to(torch.float64), w.to(torch.float64), stride=stride, padding=1
            )
            if not torch.equal(got.to(torch.float64), want):
                return "oneDNN's int8 convolution is not exact on this CPU (no VNNI?)"
    except RuntimeError as error:
        return f"oneDNN's int8 convolution failed here ({error})"
    return None


def int8_conv_problem() -> str | None:
    """None when conv layers have integer routes on this CPU (fast int8 products, and oneDNN's
    int8 convolution present and exact), else why not."""
    return int8_products_problem() or onednn_int8_conv_exact()
