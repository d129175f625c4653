"""Exact encoding of tensors as (integer mantissas, int8 block exponents) and back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .format import BlockFloat
from .packing import pack_codes, packed_size, unpack_codes
from .quantizer import dequantize_codes, quantize_codes


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor in block floating point: b-bit integer codes shaped like it, an exponent a block."""

    codes: torch.Tensor
    exponents: torch.Tensor
    fmt: BlockFloat

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the original tensor."""
        return tuple(self.codes.shape)

    def decode(self) -> torch.Tensor:
        """The float32 tensor these codes represent (bit-identical to fake quantization)."""
        return dequantize_codes(self.codes, self.exponents, self.fmt)

    def to_payload(self) -> tuple[np.ndarray, np.ndarray]:
        """Wire arrays: mantissas (int8; int16 above 8 bits; packed uint8 below) and int8 exps."""
        codes = self.codes.detach().cpu().numpy().reshape(-1)
        if self.fmt.bits < 8:
            mantissas = pack_codes(codes, self.fmt.bits)
        else:
            mantissas = codes.astype(code_dtype_numpy(self.fmt.bits))  # a copy: never aliased
        return mantissas, self.exponents.detach().cpu().numpy().astype(np.int8, copy=False)

    @classmethod
    def from_payload(
        cls,
        mantissas: np.ndarray,
        exponents: np.ndarray,
        shape: tuple[int, ...],
        fmt: BlockFloat,
    ) -> QuantizedTensor:
        """Rebuild from wire arrays, rejecting any that don't fit ``shape`` and ``fmt`` exactly."""
        if not fmt.enabled:
            raise ValueError("a 32-bit format travels as float32, not as mantissas and exponents")
        numel = math.prod(shape)
        want_dtype = np.dtype(np.uint8 if fmt.bits < 8 else code_dtype_numpy(fmt.bits))
        if mantissas.dtype != want_dtype:
            raise ValueError(
                f"mantissas must be {want_dtype} for {fmt.bits} bits, got {mantissas.dtype}"
            )
        want_size = packed_size(numel, fmt.bits) if fmt.bits < 8 else numel
        if mantissas.size != want_size:
            raise ValueError(
                f"mantissas hold {mantissas.size} values but shape {shape} at {fmt.bits} bits "
                f"needs {want_size}"
            )
        if exponents.dtype != np.int8:
            raise ValueError(f"exponents must be int8, got {exponents.dtype}")
        if exponents.size != fmt.num_blocks(shape):
            raise ValueError(
                f"got {exponents.size} exponents but layout {fmt.describe()} of shape {shape} "
                f"has {fmt.num_blocks(shape)} blocks"
            )
        if fmt.bits < 8:
            codes = unpack_codes(mantissas, fmt.bits, numel)
        else:
            codes = np.asarray(mantissas).reshape(-1)
            if fmt.bits > 8 and (
                codes.min(initial=0) < fmt.code_min or codes.max(initial=0) > fmt.code_max
            ):
                raise ValueError(f"mantissa codes fall outside the {fmt.bits}-bit range")
        return cls(
            codes=torch.from_numpy(codes.copy()).view(shape),
            exponents=torch.from_numpy(np.asarray(exponents).reshape(-1).copy()),
            fmt=fmt,
        )

    def payload_bytes(self) -> int:
        """Bytes of mantissas plus exponents on the wire (no framing)."""
        mantissas, exps = self.to_payload()
        return mantissas.nbytes + exps.nbytes


def code_dtype_numpy(bits: int) -> np.dtype:
    """numpy dtype of unpacked codes: int8 up to 8 bits, int16 above."""
    return np.dtype(np.int8 if bits <= 8 else np.int16)


def encode(
    x: torch.Tensor, fmt: BlockFloat, generator: torch.Generator | None = None
) -> QuantizedTensor:
    """Quantize ``x`` with the same rounding as training and keep it as codes and exponents."""
    codes, exps = quantize_codes(x, fmt, generator)
    return QuantizedTensor(codes=codes, exponents=exps, fmt=fmt)


def decode(q: QuantizedTensor) -> torch.Tensor:
    """float32 values of a quantized tensor."""
    return q.decode()
