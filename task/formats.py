"""Number formats the configuration asks for: training precision and the wire formats."""

from __future__ import annotations

from omegaconf import DictConfig

from quantization import FP32, BlockFloat, TrainingPrecision


def _fmt(bits: int, layout: str, q: DictConfig) -> BlockFloat:
    if bits == FP32.bits:
        return FP32
    return BlockFloat(int(bits), layout=layout, rounding=q.rounding, block_size=int(q.block_size))


def training_precision(q: DictConfig) -> TrainingPrecision:
    """Per-role formats: parameters in ``weight_layout``, activations and errors per tensor."""
    return TrainingPrecision(
        weight=_fmt(q.weight_bits, q.weight_layout, q),
        grad=_fmt(q.grad_bits, q.weight_layout, q),
        activation=_fmt(q.activation_bits, "tensor", q),
        error=_fmt(q.error_bits, "tensor", q),
        state=_fmt(q.state_bits, q.weight_layout, q),
    )


def uplink_format(q: DictConfig) -> BlockFloat:
    """Format of client updates (weights on the training grid encode losslessly in it)."""
    return _fmt(q.uplink_bits, q.wire_layout, q)


def downlink_format(q: DictConfig) -> BlockFloat:
    """Format of the server's broadcast Q(w_bar)."""
    return _fmt(q.downlink_bits, q.wire_layout, q)
