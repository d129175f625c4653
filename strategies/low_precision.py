"""Flower strategy wrapper: quantized broadcast, validated float32 updates, server averaging."""

from __future__ import annotations

import hashlib
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
from flwr.serverapp.strategy import FedAvgM, Strategy

from lowprec_fl.protocol import LINEAGE_KEY, METRICS_KEY, WEIGHT_KEY
from lowprec_fl.wire import (
    FORMAT_SUFFIX,
    MESSAGE_SLACK_BYTES,
    TensorSpec,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    float32_size,
    payload_limit,
    serialized_size,
)
from quantization import BlockFloat

from .metrics import aggregate_metrics, checked_metrics
from .moving_average import ServerMovingAverage
from .node_order import PartitionOrder, seeded_sampling
from .update_guard import RejectedUpdateError, UpdateGuard, model_norm

Weighting = Literal["num-examples", "uniform"]
#: Largest accepted aggregation weight whatever the guard says: sums stay far from overflow.
MAX_WEIGHT = 1e12
_PHASE_SEED = {"train": 0, "evaluate": 1}


@dataclass
class RoundTraffic:
    """Bytes of one round's messages as Flower serializes them, and their float32 equivalents."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    fp32_uplink_bytes: int = 0
    fp32_downlink_bytes: int = 0
    #: Why each rejected reply was refused ("node <id>: <reason>").
    rejected: list[str] = field(default_factory=list)
    #: Error replies (client-side failures) to training and to evaluation messages,
    #: as "node <id>: <reason>".
    failed: list[str] = field(default_factory=list)
    failed_evaluate: list[str] = field(default_factory=list)
    #: Accepted updates whose norm was clipped (see ``UpdateGuard``).
    clipped: int = 0
    #: ``||w_i - w_ref|| / ||w_ref||`` of each accepted update (before clipping).
    update_norm_ratios: list[float] = field(default_factory=list)
    #: The aggregated client metrics of the round's training and federated evaluation.
    train_metrics: dict[str, float | list[float]] = field(default_factory=dict)
    evaluate_metrics: dict[str, float | list[float]] = field(default_factory=dict)


class FederationStalledError(RuntimeError):
    """Several rounds in a row brought no acceptable update; the message says why."""


class LowPrecisionStrategy(Strategy):
    """Low-precision communication around any ``flwr.serverapp.strategy`` strategy.

    Broadcast: the float32 global model (the moving average) is encoded at the downlink format
    (integer mantissas + int8 exponents; 32 bits = float32). Updates: each reply is validated
    against the model (names, shapes, dtypes, bit width and blocks of the uplink format,
    packed sizes, finite values, message size, metrics, one reply per node) and dequantized to
    float32; ``guard`` then bounds its claimed weight and its update's norm relative to the
    model broadcast this round, and clips outliers. A bad reply is logged and dropped, never
    aggregated. The inner strategy aggregates in float32; the result is folded into the
    server's float32 moving average, which is what is broadcast and evaluated next.
    """

    def __init__(
        self,
        inner: Strategy,
        template: Mapping[str, TensorSpec],
        uplink: BlockFloat,
        downlink: BlockFloat,
        moving_average: ServerMovingAverage | None = None,
        weighting: Weighting = "num-examples",
        float_buffers: Iterable[str] = (),
        max_update_bytes: int | None = None,
        seed: int = 0,
        guard: UpdateGuard | None = None,
        max_failed_rounds: int = 3,
    ) -> None:
        if weighting not in ("num-examples", "uniform"):
            raise ValueError(f"weighting must be 'num-examples' or 'uniform', got {weighting!r}")
        self.inner = inner
        self.template = dict(template)
        self.uplink = uplink
        self.downlink = downlink
        self.moving_average = moving_average or ServerMovingAverage(decay=0.0)
        self.weighting = weighting
        self.float_buffers = frozenset(float_buffers)
        self.max_update_bytes = max_update_bytes or payload_limit(self.template)
        self.max_message_bytes = self.max_update_bytes + MESSAGE_SLACK_BYTES
        self.guard = guard or UpdateGuard()
        if max_failed_rounds < 0:
            raise ValueError(
                f"max_failed_rounds must be >= 0 (0 = never stop), got {max_failed_rounds}"
            )
        self.max_failed_rounds = max_failed_rounds
        #: Training rounds in a row that brought no acceptable update.
        self.failed_rounds = 0
        #: The decoded model broadcast for training, by round: what clients trained from.
        self._references: dict[int, _Reference] = {}
        self.seed = seed
        self.traffic: dict[int, RoundTraffic] = {}
        #: Rounds already done before this run (a resumed run): Flower's loop counts from 1.
        self.round_offset = 0
        self.partition_order = PartitionOrder()
        #: Names this run and any run that resumes it; clients key their state files by it.
        self.lineage = uuid.uuid4().hex
        self.arrayrecord_key: str = getattr(inner, "arrayrecord_key", "arrays")
        self.weight_key: str = getattr(inner, "weighted_by_key", WEIGHT_KEY)
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
            "\t├──> Low precision: uplink %s, downlink %s, weighting %s",
            self.uplink.describe(),
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
        """Quantize the model, then let the inner strategy sample and configure with it.

        The inner strategy is given the model the clients will receive, ``Q(arrays)`` decoded,
        not the float32 ``arrays``: stateful strategies (FedAdam, FedYogi, FedAdagrad,
        FedAvgM) take their pseudo-gradient against what the clients trained from.
        """
        server_round += self.round_offset
        encoded, formats = self._encode(server_round, "train", arrays)
        reference = decode_tensors(encoded, formats)  # what the clients will train from
        self._references = {server_round: _Reference(reference, model_norm(reference))}
        grid = self.partition_order.ordered(grid)
        config = ConfigRecord({**config, LINEAGE_KEY: self.lineage})
        with seeded_sampling(self._round_seed(server_round, "train")):
            messages = list(
                self.inner.configure_train(server_round, _record(reference), config, grid)
            )
        return self._replace_content(server_round, messages, encoded, formats)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Same as ``configure_train`` for federated evaluation."""
        server_round += self.round_offset
        grid = self.partition_order.ordered(grid)
        with seeded_sampling(self._round_seed(server_round, "evaluate")):
            messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        if not messages:  # e.g. fraction_evaluate=0: nothing to encode
            return messages
        encoded, formats = self._encode(server_round, "evaluate", arrays)
        return self._replace_content(server_round, messages, encoded, formats)

    def _round_seed(self, server_round: int, phase: str) -> int:
        """The seed of one round's phase: its client sample and its broadcast rounding."""
        return (self.seed * 1_000_003 + server_round) * 2 + _PHASE_SEED[phase]

    def _encode(
        self, server_round: int, phase: str, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, ConfigRecord]:
        """The model at the downlink format: (encoded arrays, their format record)."""
        generator = torch.Generator().manual_seed(self._round_seed(server_round, phase))
        tensors = {
            name: torch.from_numpy(self._as_template(name, arrays[name].numpy())) for name in arrays
        }
        encoded, formats = encode_tensors(
            tensors, self.downlink, generator, keep_float=self.float_buffers
        )
        return encoded, formats

    def _replace_content(
        self,
        server_round: int,
        messages: list[Message],
        encoded: ArrayRecord,
        formats: ConfigRecord,
    ) -> list[Message]:
        """Put the encoded model into the inner strategy's messages; count the bytes."""
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
                    serialized_size(original),  # the inner's message: the model in float32
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
        """Validate and dequantize replies, aggregate with the inner strategy, then average.

        Raises ``FederationStalledError`` once ``max_failed_rounds`` rounds in a row brought
        no acceptable update: a run whose clients all fail should stop, not "finish".
        """
        server_round += self.round_offset
        accepted, metrics, weights = self._accept(server_round, replies, with_arrays=True)
        if not metrics:
            self._no_update(server_round)
            return None, None
        reference = self._references.get(server_round)
        if reference is not None:
            _anchor_reference(self.inner, reference.tensors)
        arrays, inner_metrics = self.inner.aggregate_train(server_round, accepted)
        merged = _merge(inner_metrics, aggregate_metrics(metrics, weights, self.weight_key))
        self._traffic(server_round).train_metrics = dict(merged.items())
        if arrays is None:
            self._no_update(server_round, f"{type(self.inner).__name__} aggregated nothing")
            return None, merged
        raw = {name: arrays[name].numpy() for name in arrays}
        broken = [n for n, v in raw.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if broken:  # e.g. a server optimizer that diverged: never broadcast it
            reason = f"the {type(self.inner).__name__} aggregate has NaN or inf in {broken[:3]}"
            log(WARNING, "Round %d: %s; the global model stays as it was", server_round, reason)
            self._no_update(server_round, reason)
            return None, merged
        self.failed_rounds = 0
        model = {name: self._as_template(name, value) for name, value in raw.items()}
        broadcast = self.moving_average.update(server_round, model)
        return ArrayRecord({name: _array(value) for name, value in broadcast.items()}), merged

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate replies' metrics, then aggregate them key by key (see ``metrics``)."""
        server_round += self.round_offset
        accepted, metrics, weights = self._accept(server_round, replies, with_arrays=False)
        if not metrics:
            return None
        inner_metrics = self.inner.aggregate_evaluate(server_round, accepted)
        merged = _merge(inner_metrics, aggregate_metrics(metrics, weights, self.weight_key))
        self._traffic(server_round).evaluate_metrics = dict(merged.items())
        return merged

    def _no_update(self, server_round: int, reason: str | None = None) -> None:
        self.failed_rounds += 1
        traffic = self._traffic(server_round)
        reasons = ([reason] if reason else []) + traffic.rejected + traffic.failed
        log(
            WARNING,
            "Round %d: no valid update arrived; the global model stays as it was (%d round(s) "
            "in a row)",
            server_round,
            self.failed_rounds,
        )
        if self.max_failed_rounds and self.failed_rounds >= self.max_failed_rounds:
            shown = "; ".join(reasons[:3]) or "no client replied"
            raise FederationStalledError(
                f"no client update was accepted in the last {self.failed_rounds} rounds "
                f"(through round {server_round}), so training cannot progress. Last reasons: "
                f"{shown}. Fix the clients (their logs say more), or raise "
                "server.max_failed_rounds (0 = never stop)."
            )

    def _accept(
        self, server_round: int, replies: Iterable[Message], with_arrays: bool
    ) -> tuple[list[Message], list[dict], list[float]]:
        """Replies fit for the inner strategy, with their metrics and weights (valid only).

        Accepted replies carry only dequantized float32 arrays (norm-clipped, see
        ``UpdateGuard``) and a MetricRecord with the weight; the full metrics come back
        separately, in the same order as the valid replies (sorted by content).
        """
        traffic = self._traffic(server_round)
        reference = self._references.get(server_round) if with_arrays else None
        seen: set[int] = set()
        errors: list[Message] = []
        candidates: list[_Candidate] = []
        for reply in replies:
            if reply.has_error():
                errors.append(reply)  # the inner strategy logs it and skips it
                failures = traffic.failed if with_arrays else traffic.failed_evaluate
                failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            node = reply.metadata.src_node_id
            try:
                size = serialized_size(reply.content)
                traffic.uplink_bytes += size
                traffic.fp32_uplink_bytes += self._fp32_equivalent(reply.content, with_arrays)
                if node in seen:
                    raise RejectedUpdateError(
                        "sent a second reply this round; only the first counts"
                    )
                seen.add(node)
                if size > self.max_message_bytes:
                    raise WireFormatError(
                        f"message of {size} bytes exceeds the limit of {self.max_message_bytes}"
                    )
                candidates.append(self._candidate(reply, with_arrays, reference))
            except Exception as err:  # a bad update must never stop the server
                reason = f"node {node}: {err}"
                traffic.rejected.append(reason)
                log(WARNING, "Round %d: rejected the reply from %s", server_round, reason)
        # Arrival order varies, and node ids change when a run is resumed or redeployed: order
        # by content, so float32 sums (and resumed runs) are reproducible bit for bit.
        candidates.sort(key=lambda c: content_digest(c.reply.content, self.weight_key))
        if with_arrays and reference is not None:
            norms = [c.norm for c in candidates]
            traffic.update_norm_ratios = [n / max(reference.norm, 1e-12) for n in norms]
            threshold = self.guard.clip_threshold(norms)
            for c in candidates:
                clipped = self.guard.clip(c.tensors, reference.tensors, c.norm, threshold)
                if clipped is not None:
                    log(
                        INFO,
                        "Round %d: clipped the update of node %d from norm %.4g to %.4g",
                        server_round,
                        c.reply.metadata.src_node_id,
                        c.norm,
                        threshold,
                    )
                    traffic.clipped += 1
                    c.tensors = clipped
        for c in candidates:
            content = RecordDict({METRICS_KEY: MetricRecord({self.weight_key: c.weight})})
            if with_arrays:
                content[self.arrayrecord_key] = _record(c.tensors)
            c.reply.content = content
        accepted = [c.reply for c in candidates]
        return (
            errors + accepted,
            [c.metrics for c in candidates],
            [float(c.weight) for c in candidates],
        )

    def _candidate(
        self,
        reply: Message,
        with_arrays: bool,
        reference: _Reference | None,
    ) -> _Candidate:
        """Decode and check one reply (raises naming the first problem)."""
        content = reply.content
        metric_records = list(content.metric_records.items())
        if len(metric_records) != 1:
            raise WireFormatError(f"expected one MetricRecord, got {len(metric_records)}")
        metrics = checked_metrics(metric_records[0][1])
        weight = metrics.get(self.weight_key)
        if isinstance(weight, list) or weight is None:
            raise WireFormatError(f"metric {self.weight_key!r} is missing or not a number")
        if not 0 < weight <= MAX_WEIGHT:
            raise WireFormatError(
                f"metric {self.weight_key!r} must be in (0, {MAX_WEIGHT:.0e}], got {weight}"
            )
        self.guard.check_weight(weight, training=with_arrays)
        if self.weighting == "uniform":
            weight = 1
        candidate = _Candidate(reply=reply, metrics=metrics, weight=weight)
        if not with_arrays:
            return candidate
        array_records = content.array_records
        if set(array_records.keys()) != {self.arrayrecord_key}:
            raise WireFormatError(
                f"expected one ArrayRecord {self.arrayrecord_key!r}, "
                f"got {sorted(array_records.keys())}"
            )
        formats = content.config_records.get(self.format_key)
        if formats is None:
            raise WireFormatError(f"the ConfigRecord {self.format_key!r} is missing")
        candidate.tensors = decode_tensors(
            array_records[self.arrayrecord_key],
            formats,
            expected=self.template,
            fmt=self.uplink,
            allow_float=self.float_buffers,
            max_bytes=self.max_update_bytes,
        )
        if reference is not None:
            self.guard.check_buffers(candidate.tensors, reference.tensors)
            candidate.norm = self.guard.check_norm(
                candidate.tensors, reference.tensors, reference.norm
            )
        return candidate

    def _fp32_equivalent(self, content: RecordDict, with_arrays: bool) -> int:
        """Size of the same reply had its model travelled as plain float32."""
        rest = RecordDict(
            {k: v for k, v in content.items() if k not in (self.arrayrecord_key, self.format_key)}
        )
        has_model = with_arrays and self.arrayrecord_key in content.array_records
        return serialized_size(rest) + (self._fp32_arrays_bytes if has_model else 0)

    def _as_template(self, name: str, value: np.ndarray) -> np.ndarray:
        """An array in the model's own shape and dtype (a 0-d array may arrive 1-d)."""
        spec = self.template[name]
        if value.size != math.prod(spec.shape):
            raise ValueError(f"the inner strategy returned {name!r} with shape {value.shape}")
        value = value.reshape(spec.shape)
        if spec.dtype.is_floating_point:
            return value.astype(np.float32, copy=False)
        # np.rint returns a scalar for a 0-d array; np.asarray keeps it an array
        return np.asarray(np.rint(value)).astype(torch.empty(0, dtype=spec.dtype).numpy().dtype)

    def _traffic(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic())


@dataclass(frozen=True)
class _Reference:
    """The model clients trained from this round, and its norm (see ``UpdateGuard``)."""

    tensors: dict[str, torch.Tensor]
    norm: float


@dataclass
class _Candidate:
    """A reply that passed the checks so far, with what was decoded from it."""

    reply: Message
    metrics: dict
    weight: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    norm: float = 0.0


def content_digest(content: RecordDict, weight_key: str = WEIGHT_KEY) -> bytes:
    """A digest of what a reply contributes to the aggregate: its arrays and its weight.

    Replies are aggregated in the order of this digest (of the reply as received): the same
    updates give the same float32 sums whatever their node ids and arrival order. Other
    metrics (timings, losses) stay out of it: they differ between runs of the same updates.
    """
    h = hashlib.blake2b(digest_size=16)
    for record_name, record in sorted(content.array_records.items()):
        h.update(record_name.encode())
        for name, array in record.items():
            h.update(name.encode() + b"\0" + array.dtype.encode() + bytes(array.data))
    for record in content.metric_records.values():
        h.update(repr(record.get(weight_key)).encode())
    return h.digest()


def _merge(inner: MetricRecord | None, ours: MetricRecord) -> MetricRecord:
    """The inner strategy's metrics (if any) completed with the per-key aggregate."""
    return MetricRecord({**(dict(inner.items()) if inner is not None else {}), **ours})


def _record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: _array(t.numpy()) for name, t in tensors.items()})


def _anchor_reference(strategy: Strategy, reference: Mapping[str, torch.Tensor]) -> None:
    """Make FedAvgM's reference model the broadcast the clients trained from.

    FedOpt strategies set theirs in ``configure_train`` (to what this wrapper passes); FedAvgM
    sets it once and then keeps its own result, which differs from the broadcast when the
    server averages or quantizes. Wrappers such as Flower's DP strategies are looked through.
    """
    while not isinstance(strategy, FedAvgM) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy  # Flower's wrappers keep the wrapped strategy here
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = _record(reference)


def _array(value: np.ndarray) -> Array:
    # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
    return Array(np.asarray(value, order="C"))


def _fp32_record_bytes(template: Mapping[str, TensorSpec], key: str) -> int:
    """Serialized size of the model as a plain float32 ArrayRecord under ``key``."""
    zeros = {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in template.items()}
    return float32_size(zeros, key)
