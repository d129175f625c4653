"""A Flower ClientApp mod: the app sees float32 models, the wire carries quantized ones.

Use it like Flower's own mods (``ClientApp(mods=[LowPrecisionMod(...)])``); it pairs with the
server's ``strategies.QuantizedMessages``. Low-precision *training* stays the app's choice
(``quantization.LowPrecisionOptimizer``, ``quantization.attach_quantizers``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from logging import ERROR
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from lowprec_fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FORMAT_SUFFIX,
    METRICS_KEY,
    PARTITION_KEY,
    PAYLOAD_BYTES_KEY,
    ROUND_KEY,
    model_records,
)
from lowprec_fl.wire import (
    TensorSpec,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    message_format,
    serialized_size,
    specs_of,
)
from quantization import BlockFloat


class LowPrecisionMod:
    """Decode the quantized broadcast before the app runs; encode its reply after.

    Inbound (train and evaluate messages): the ``arrays`` ArrayRecord and its format record
    are decoded - the format pinned to ``downlink`` (bit width and blocks; a collection of
    formats accepts any of them), memory bounded by the message - into a plain float32
    ArrayRecord under the same key, and the format record is removed, so the app and any mod
    after this one (e.g. Flower's ``fixedclipping_mod``) see an ordinary Flower message.
    Outbound (train replies): the app's ArrayRecord must hold exactly the broadcast's
    tensors, shapes and dtypes, with finite values; it is encoded at ``uplink`` (weights
    already on that grid encode losslessly), the format record is attached and the reply's
    MetricRecord gets ``payload-bytes``, the encoded arrays' size. Tensors the server sent in
    float32 in a quantized broadcast (e.g. BatchNorm statistics with
    ``quantize_buffers=false``) go back in float32.
    Any problem becomes an error reply with the reason
    (``ErrorCode.MOD_FAILED_PRECONDITION``), as Flower's DP mods do.

    ``max_bytes`` (e.g. ``lowprec_fl.wire.payload_limit`` of the app's model plus
    ``MESSAGE_SLACK_BYTES``) refuses a larger broadcast: a server then cannot make the client
    hold more than its own model takes. Without it, decoding is bounded by the message.

    The upload's stochastic rounding draws from a generator keyed by ``seed``, the round and
    the node's ``partition-id`` (its node id when it has none), so simulations repeat.
    """

    def __init__(
        self,
        uplink: BlockFloat,
        downlink: BlockFloat | Collection[BlockFloat],
        seed: int = 0,
        max_bytes: int | None = None,
    ) -> None:
        self.uplink = uplink
        self.max_bytes = max_bytes
        formats = [downlink] if isinstance(downlink, BlockFloat) else list(downlink)
        if not formats:
            raise ValueError("downlink must name at least one format")
        #: The accepted broadcast formats, by width.
        self.downlink = {fmt.bits: fmt for fmt in formats}
        if len(self.downlink) != len(formats):
            raise ValueError("downlink formats must have distinct widths")
        self.seed = seed

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Run the app between decoding the broadcast and encoding the reply."""
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, ctxt)
        try:
            decoded, raw_float = self._decode(msg)
            server_round = self._round(msg)
        except ValueError as err:
            return _error(msg, f"LowPrecisionMod: the broadcast was refused: {err}")
        content = RecordDict(
            {k: v for k, v in msg.content.items() if k != ARRAYS_KEY + FORMAT_SUFFIX}
        )
        content[ARRAYS_KEY] = ArrayRecord(
            {name: Array(np.asarray(t.numpy(), order="C")) for name, t in decoded.items()}
        )
        original, msg.content = msg.content, content
        try:
            reply = call_next(msg, ctxt)
        finally:  # the caller's message stays as it was received
            msg.content = original
        if kind != MessageType.TRAIN or reply.has_error():
            return reply
        party = ctxt.node_config.get(PARTITION_KEY, ctxt.node_id)
        try:
            self._encode(reply, specs_of(decoded), raw_float, server_round, int(party))
        except ValueError as err:
            return _error(msg, f"LowPrecisionMod: the app's reply was refused: {err}")
        return reply

    def _decode(self, msg: Message) -> tuple[dict[str, torch.Tensor], set[str]]:
        if self.max_bytes is not None:
            size = serialized_size(msg.content)
            if size > self.max_bytes:
                raise WireFormatError(
                    f"the broadcast is {size} bytes, more than the limit of {self.max_bytes}"
                )
        arrays, formats = model_records(msg.content)
        fmt = message_format(formats, self.downlink)
        # No model to compare with: names and shapes come from the message itself, whose
        # arrays must hold every value (so decoding takes at most ~8x the message's bytes).
        decoded = decode_tensors(arrays, formats, fmt=fmt, allow_float=set(formats))
        # Tensors a quantized broadcast carried in float32 (e.g. BatchNorm statistics with
        # quantize_buffers=false) go back in float32; a float32 broadcast says nothing.
        raw_float = {
            name
            for name, t in decoded.items()
            if fmt.enabled and t.is_floating_point() and "bits" not in json.loads(formats[name])
        }
        return decoded, raw_float

    def _encode(
        self,
        reply: Message,
        expected: dict[str, TensorSpec],
        raw_float: set[str],
        server_round: int,
        party: int,
    ) -> None:
        records = reply.content.array_records
        if set(records) != {ARRAYS_KEY}:
            raise ValueError(f"expected one ArrayRecord {ARRAYS_KEY!r}, got {sorted(records)}")
        tensors = {
            name: torch.from_numpy(array.numpy()) for name, array in records[ARRAYS_KEY].items()
        }
        if set(tensors) != set(expected):
            missing, extra = (
                sorted(set(expected) - set(tensors)),
                sorted(set(tensors) - set(expected)),
            )
            raise ValueError(
                f"its tensors differ from the broadcast: missing {missing[:5]}, extra {extra[:5]}"
            )
        for name, spec in expected.items():
            t = tensors[name]
            if (
                tuple(t.shape) != spec.shape
                or t.is_floating_point() != spec.dtype.is_floating_point
            ):
                raise ValueError(
                    f"{name!r} is {t.dtype} {tuple(t.shape)}, the broadcast's is "
                    f"{spec.dtype} {spec.shape}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name!r} holds NaN or inf")
        generator = round_generator(self.seed, party, server_round)
        encoded, formats = encode_tensors(tensors, self.uplink, generator, keep_float=raw_float)
        reply.content[ARRAYS_KEY] = encoded
        reply.content[ARRAYS_KEY + FORMAT_SUFFIX] = formats
        metrics = reply.content.metric_records.get(METRICS_KEY)
        if metrics is not None:
            metrics[PAYLOAD_BYTES_KEY] = encoded.count_bytes()

    @staticmethod
    def _round(msg: Message) -> int:
        config = msg.content.config_records.get(CONFIG_KEY, {})
        return config_value(config, ROUND_KEY, 0, int, 0, MAX_ROUND)


#: Largest server round a client accepts (it names the client's state files).
MAX_ROUND = 10**9


def config_value(
    config: Mapping[str, Any],
    key: str,
    default: Any,
    kind: type,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A value of the server's config, checked: its type and, for numbers, its range."""
    value = config.get(key, default)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and low is not None and not (low <= value <= high):  # also False for NaN
        ok = False
    if not ok:
        bounds = f" in [{low:g}, {high:g}]" if low is not None else ""
        raise ValueError(
            f"the server's config has {key}={value!r}: expected a {kind.__name__}{bounds}"
        )
    return value


def round_generator(seed: int, party: int, server_round: int) -> torch.Generator:
    """The client's generator for one round: data order, dither keys, upload rounding."""
    return torch.Generator().manual_seed(
        ((int(seed) * 100_003 + party) * 10_007 + server_round) & ((1 << 62) - 1)
    )


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


__all__ = ["LowPrecisionMod", "config_value", "round_generator"]
