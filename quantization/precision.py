"""Which format each role in training uses: weights, gradients, activations, errors, state."""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import FP32, BlockFloat
from .state_codec import LowBitState


@dataclass(frozen=True)
class TrainingPrecision:
    """Per-role formats for low-precision training (mixed precision allowed, 32 bits = off)."""

    weight: BlockFloat = field(default_factory=lambda: BlockFloat(8, layout="auto"))
    grad: BlockFloat = field(default_factory=lambda: BlockFloat(8, layout="auto"))
    activation: BlockFloat = field(default_factory=lambda: BlockFloat(8, layout="tensor"))
    error: BlockFloat = field(default_factory=lambda: BlockFloat(8, layout="tensor"))
    #: Optimizer state: BFP on the weight grid, or low-bit code maps (``LowBitState``).
    state: BlockFloat | LowBitState = field(default_factory=lambda: BlockFloat(8, layout="auto"))

    @classmethod
    def uniform(cls, bits: int, rounding: str = "stochastic") -> TrainingPrecision:
        """Every role at ``bits`` with the reference code's layouts (32 = full precision)."""
        if bits == FP32.bits:
            return cls.full()
        param = BlockFloat(bits, layout="auto", rounding=rounding)
        flow = BlockFloat(bits, layout="tensor", rounding=rounding)
        return cls(weight=param, grad=param, activation=flow, error=flow, state=param)

    @classmethod
    def full(cls) -> TrainingPrecision:
        """Plain float32 training."""
        return cls(weight=FP32, grad=FP32, activation=FP32, error=FP32, state=FP32)

    @property
    def quantizes_flow(self) -> bool:
        """Whether activations or errors are quantized (so quantizers must be attached)."""
        return self.activation.enabled or self.error.enabled
