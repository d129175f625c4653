"""Flower strategy wrapper: quantized broadcast, validated float32 updates, server averaging."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from quantization import BlockFloat
from quantization.wire import (
    FORMAT_SUFFIX,
    TensorSpec,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    float32_size,
    serialized_size,
)

from .moving_average import ServerMovingAverage
from .node_order import PartitionOrder, seeded_sampling

Weighting = Literal["num-examples", "uniform"]
METRICS_KEY = "metrics"
#: Train-config key naming the run lineage (a run and its resumptions), see ``lineage``.
LINEAGE_KEY = "lineage"
#: Largest accepted aggregation weight: sums of such weights stay far from overflow.
MAX_WEIGHT = 1e12
_PHASE_SEED = {"train": 0, "evaluate": 1}


@dataclass
class RoundTraffic:
    """Bytes of one round's messages as Flower serializes them, and their float32 equivalents."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    fp32_uplink_bytes: int = 0
    fp32_downlink_bytes: int = 0
    rejected: list[str] = field(default_factory=list)


class LowPrecisionStrategy(Strategy):
    """Low-precision communication around any ``flwr.serverapp.strategy`` strategy.

    Broadcast: the float32 global model (the moving average) is encoded at the downlink format
    (integer mantissas + int8 exponents; 32 bits = float32). Updates: each reply is validated
    against the model (names, shapes, dtypes, bit width, packed sizes, finite values, payload
    size, metrics) and dequantized to float32; a bad reply is logged and dropped, never
    aggregated. The inner strategy aggregates in float32; the result is folded into the
    server's float32 moving average, which is what is broadcast and evaluated next.
    """

    def __init__(
        self,
        inner: Strategy,
        template: Mapping[str, TensorSpec],
        uplink_bits: int,
        downlink: BlockFloat,
        moving_average: ServerMovingAverage | None = None,
        weighting: Weighting = "num-examples",
        float_buffers: Iterable[str] = (),
        max_update_bytes: int | None = None,
        seed: int = 0,
    ) -> None:
        if weighting not in ("num-examples", "uniform"):
            raise ValueError(f"weighting must be 'num-examples' or 'uniform', got {weighting!r}")
        self.inner = inner
        self.template = dict(template)
        self.uplink_bits = uplink_bits
        self.downlink = downlink
        self.moving_average = moving_average or ServerMovingAverage(decay=0.0)
        self.weighting = weighting
        self.float_buffers = frozenset(float_buffers)
        # An update is never larger than the model in float32 (every format is <= 4 bytes/value).
        self.max_update_bytes = max_update_bytes or int(1.1 * _float32_bytes(self.template)) + (
            1 << 16
        )
        self.seed = seed
        self.traffic: dict[int, RoundTraffic] = {}
        #: Rounds already done before this run (a resumed run): Flower's loop counts from 1.
        self.round_offset = 0
        self.partition_order = PartitionOrder()
        #: Names this run and any run that resumes it; clients key their state files by it.
        self.lineage = uuid.uuid4().hex
        self.arrayrecord_key: str = getattr(inner, "arrayrecord_key", "arrays")
        self.weight_key: str = getattr(inner, "weighted_by_key", "num-examples")
        self._fp32_arrays_bytes = _fp32_record_bytes(self.template, self.arrayrecord_key)

    @property
    def format_key(self) -> str:
        """Key of the ConfigRecord that describes the arrays' wire format."""
        return self.arrayrecord_key + FORMAT_SUFFIX

    def summary(self) -> None:
        """Log this wrapper's settings, then the inner strategy's."""
        ma = self.moving_average
        log(
            INFO,
            "\t├──> Low precision: uplink %d bits, downlink %s, weighting %s",
            self.uplink_bits,
            self.downlink.describe(),
            self.weighting,
        )
        log(
            INFO,
            "\t├──> Server moving average: lambda %.3f from round %d%s",
            ma.decay,
            ma.start_round,
            " with warm-up" if ma.warmup else "",
        )
        log(INFO, "\t└──> Inner strategy: %s", type(self.inner).__name__)
        self.inner.summary()

    # ----------------------------------------------------------------- broadcast
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy sample and configure, then quantize the model it sends."""
        server_round += self.round_offset
        grid = self.partition_order.ordered(grid)
        config = ConfigRecord({**config, LINEAGE_KEY: self.lineage})
        with seeded_sampling(self._round_seed(server_round, "train")):
            messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._quantize_broadcast(server_round, "train", arrays, messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Same as ``configure_train`` for federated evaluation."""
        server_round += self.round_offset
        grid = self.partition_order.ordered(grid)
        with seeded_sampling(self._round_seed(server_round, "evaluate")):
            messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return self._quantize_broadcast(server_round, "evaluate", arrays, messages)

    def _round_seed(self, server_round: int, phase: str) -> int:
        """The seed of one round's phase: its client sample and its broadcast rounding."""
        return (self.seed * 1_000_003 + server_round) * 2 + _PHASE_SEED[phase]

    def _quantize_broadcast(
        self, server_round: int, phase: str, arrays: ArrayRecord, messages: list[Message]
    ) -> list[Message]:
        if not messages:
            return messages
        generator = torch.Generator().manual_seed(self._round_seed(server_round, phase))
        tensors = {name: torch.from_numpy(arrays[name].numpy()) for name in arrays}
        encoded, formats = encode_tensors(
            tensors, self.downlink, generator, keep_float=self.float_buffers
        )
        traffic = self._traffic(server_round)
        # Inner strategies share one content among messages: encode and measure it once.
        replaced: dict[int, tuple[RecordDict, int, int]] = {}
        for message in messages:
            original = message.content
            if id(original) not in replaced:
                content = RecordDict(dict(original.items()))
                content[self.arrayrecord_key] = encoded
                content[self.format_key] = formats
                replaced[id(original)] = (
                    content,
                    serialized_size(content),
                    serialized_size(original),
                )
            content, size, fp32_size = replaced[id(original)]
            message.content = content
            traffic.downlink_bytes += size
            traffic.fp32_downlink_bytes += fp32_size
        return messages

    # ----------------------------------------------------------------- updates
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and dequantize replies, aggregate with the inner strategy, then average."""
        server_round += self.round_offset
        accepted = self._accept(server_round, replies, with_arrays=True)
        if not any(not reply.has_error() for reply in accepted):
            log(
                WARNING,
                "Round %d: no valid update arrived; the global model stays as it was",
                server_round,
            )
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is None:
            return None, metrics
        model = {name: self._as_template_dtype(name, arrays[name].numpy()) for name in arrays}
        broadcast = self.moving_average.update(server_round, model)
        return ArrayRecord({name: _array(value) for name, value in broadcast.items()}), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate replies' metrics, then aggregate them with the inner strategy."""
        server_round += self.round_offset
        accepted = self._accept(server_round, replies, with_arrays=False)
        if not accepted:
            return None
        return self.inner.aggregate_evaluate(server_round, accepted)

    def _accept(
        self, server_round: int, replies: Iterable[Message], with_arrays: bool
    ) -> list[Message]:
        accepted = []
        traffic = self._traffic(server_round)
        for reply in replies:
            if reply.has_error():
                accepted.append(reply)  # the inner strategy logs it and skips it
                continue
            node = reply.metadata.src_node_id
            try:
                traffic.uplink_bytes += serialized_size(reply.content)
                traffic.fp32_uplink_bytes += self._fp32_equivalent(reply.content, with_arrays)
                reply.content = self._sanitize(reply.content, with_arrays)
            except Exception as err:  # a bad update must never stop the server
                reason = f"node {node}: {err}"
                traffic.rejected.append(reason)
                log(WARNING, "Round %d: rejected the reply from %s", server_round, reason)
                continue
            accepted.append(reply)
        # Arrival order varies; a fixed order makes float32 sums (and resumed runs) reproducible.
        accepted.sort(key=lambda r: r.metadata.src_node_id)
        return _common_metrics(accepted)

    def _sanitize(self, content: RecordDict, with_arrays: bool) -> RecordDict:
        """A fresh RecordDict holding only dequantized float32 arrays and checked metrics."""
        metric_records = list(content.metric_records.items())
        if len(metric_records) != 1:
            raise WireFormatError(f"expected one MetricRecord, got {len(metric_records)}")
        _, metrics = metric_records[0]
        clean = RecordDict({METRICS_KEY: self._checked_metrics(metrics)})
        if with_arrays:
            array_records = content.array_records
            if set(array_records.keys()) != {self.arrayrecord_key}:
                raise WireFormatError(
                    f"expected one ArrayRecord {self.arrayrecord_key!r}, "
                    f"got {sorted(array_records.keys())}"
                )
            formats = content.config_records.get(self.format_key)
            if formats is None:
                raise WireFormatError(f"the ConfigRecord {self.format_key!r} is missing")
            tensors = decode_tensors(
                array_records[self.arrayrecord_key],
                formats,
                expected=self.template,
                bits=self.uplink_bits,
                allow_float=self.float_buffers,
                max_bytes=self.max_update_bytes,
            )
            clean[self.arrayrecord_key] = ArrayRecord(
                {name: _array(t.numpy()) for name, t in tensors.items()}
            )
        return clean

    def _checked_metrics(self, metrics: MetricRecord) -> MetricRecord:
        weight = metrics.get(self.weight_key)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise WireFormatError(f"metric {self.weight_key!r} is missing or not a number")
        if not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT:
            raise WireFormatError(
                f"metric {self.weight_key!r} must be in (0, {MAX_WEIGHT:.0e}], got {weight}"
            )
        for name, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                raise WireFormatError(f"metric {name!r} is not finite")
        checked = MetricRecord(dict(metrics.items()))
        if self.weighting == "uniform":
            checked[self.weight_key] = 1
        return checked

    def _fp32_equivalent(self, content: RecordDict, with_arrays: bool) -> int:
        """Size of the same reply had its model travelled as plain float32."""
        rest = RecordDict(
            {k: v for k, v in content.items() if k not in (self.arrayrecord_key, self.format_key)}
        )
        return serialized_size(rest) + (self._fp32_arrays_bytes if with_arrays else 0)

    def _as_template_dtype(self, name: str, value: np.ndarray) -> np.ndarray:
        spec = self.template.get(name)
        if spec is None or spec.dtype.is_floating_point:
            return value.astype(np.float32, copy=False)
        return np.rint(value).astype(torch.empty(0, dtype=spec.dtype).numpy().dtype)

    def _traffic(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic())


def _common_metrics(replies: list[Message]) -> list[Message]:
    """Keep only metric keys every reply has: Flower's aggregation requires identical keys."""
    contents = [r.content for r in replies if not r.has_error()]
    if not contents:
        return replies
    common = set.intersection(*(set(c[METRICS_KEY].keys()) for c in contents))
    for content in contents:
        metrics = content[METRICS_KEY]
        if set(metrics.keys()) != common:
            content[METRICS_KEY] = MetricRecord({k: v for k, v in metrics.items() if k in common})
    return replies


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _float32_bytes(template: Mapping[str, TensorSpec]) -> int:
    return sum(4 * math.prod(spec.shape) for spec in template.values())


def _fp32_record_bytes(template: Mapping[str, TensorSpec], key: str) -> int:
    """Serialized size of the model as a plain float32 ArrayRecord under ``key``."""
    zeros = {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in template.items()}
    return float32_size(zeros, key)
