"""Number formats the configuration asks for: training precision and the wire formats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lowprec_fl.protocol import NODE_BITS_KEY
from quantization import FP32, BlockFloat, LowBitState, TrainingPrecision

#: The quantization keys a client at another width sets to it: training and upload.
CLIENT_WIDTH_KEYS = ("weight_bits", "grad_bits", "activation_bits", "error_bits", "uplink_bits")
#: quantization.state_format: code maps with scales (``LowBitState``), or the weight grid.
STATE_FORMATS = ("lowbit", "bfp")


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
        state=state_format(q),
    )


def state_format(q: DictConfig) -> BlockFloat | LowBitState:
    """The optimizer state's format: ``state_format`` ``lowbit`` (code maps, 8 or 4 bits) or
    ``bfp`` (the weight grid); 32 bits is float32 either way. Raises ``ValueError``."""
    bits = int(q.state_bits)
    if q.state_format not in STATE_FORMATS:
        raise ValueError(f"use one of {STATE_FORMATS}, got {q.state_format!r}")
    if bits != FP32.bits and q.state_format == "lowbit":
        try:
            return LowBitState.at(bits)
        except ValueError as err:
            raise ValueError(
                f"{err} (32 = float32); use state_format=bfp for other widths"
            ) from None
    return _fmt(bits, q.weight_layout, q)


def uplink_format(q: DictConfig) -> BlockFloat:
    """Format of client updates (weights on the training grid encode losslessly in it)."""
    return _fmt(q.uplink_bits, q.wire_layout, q)


def downlink_format(q: DictConfig) -> BlockFloat:
    """Format of the server's broadcast Q(w_bar)."""
    return _fmt(q.downlink_bits, q.wire_layout, q)


def accepted_bits(cfg: DictConfig) -> list[int]:
    """Uplink widths the server accepts: ``uplink_bits``, ``clients.bits``, ``accepted_bits``."""
    widths = {int(cfg.quantization.uplink_bits)}
    widths |= {int(b) for b in cfg.clients.bits} | {int(b) for b in cfg.clients.accepted_bits}
    return sorted(widths)


def client_bits(cfg: DictConfig, node_config: Mapping[str, Any], party: int) -> int | None:
    """This client's own width, if it has one: its node config's, else ``clients.bits``'s
    (``bits[party % len(bits)]``, ``party`` the client's partition id in simulation).

    Raises ``ValueError`` naming the setting when the width is not one the server accepts.
    """
    if NODE_BITS_KEY in node_config:
        bits, source = node_config[NODE_BITS_KEY], f"--node-config {NODE_BITS_KEY}"
    elif len(cfg.clients.bits):
        bits = cfg.clients.bits[party % len(cfg.clients.bits)]
        source = f"clients.bits (client {party})"
    else:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in accepted_bits(cfg):
        raise ValueError(
            f"{source} asks for {bits!r}-bit training, but the server accepts only "
            f"{accepted_bits(cfg)} bits: add it to clients.accepted_bits in the run config"
        )
    return bits


def client_quantization(cfg: DictConfig, bits: int | None) -> DictConfig:
    """``cfg.quantization`` for a client that trains and uploads at ``bits`` (None: as is)."""
    if bits is None:
        return cfg.quantization
    q = OmegaConf.to_container(cfg.quantization, resolve=True)
    q.update(dict.fromkeys(CLIENT_WIDTH_KEYS, bits))
    return OmegaConf.create(q)


def client_downlinks(cfg: DictConfig, bits: int | None) -> list[BlockFloat]:
    """The broadcast formats a client accepts: the server's downlink, and its own width's.

    The server sends a client at another width its own format once it has heard from it
    (``strategies.QuantizedMessages.downlink_for``); before that, the usual downlink.
    """
    default = downlink_format(cfg.quantization)
    if bits is None or bits == int(cfg.quantization.uplink_bits):
        return [default]
    own = _fmt(bits, cfg.quantization.wire_layout, cfg.quantization)
    return [default] if own.bits == default.bits else [default, own]
