"""Flower strategy wrapper: quantized messages both ways, replies validated and counted."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Literal, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy

from lowprec_fl.protocol import METRICS_KEY, WEIGHT_KEY
from lowprec_fl.wire import (
    FORMAT_SUFFIX,
    MESSAGE_SLACK_BYTES,
    TensorSpec,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    float32_size,
    message_format,
    payload_limit,
    serialized_size,
)
from quantization import BlockFloat

from .metrics import aggregate_metrics, checked_metrics
from .update_guard import RejectedUpdateError, UpdateGuard, model_norm
from .wrapper import StrategyWrapper, find_wrapper, nonnegative_int

Weighting = Literal["num-examples", "uniform"]
#: The aggregation weightings: by the claimed number of examples, or equal (the paper).
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
#: The default wire format: 8-bit mantissas, one int8 exponent per 32 values (OCP MXINT8).
DEFAULT_FORMAT = BlockFloat(8, layout="block")
#: Largest accepted aggregation weight whatever the guard says: sums stay far from overflow.
MAX_WEIGHT = 1e12
_PHASE_SEED = {"train": 0, "evaluate": 1}


@dataclass
class PhaseTraffic:
    """One phase (training or evaluation) of one round: bytes as Flower serializes them."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    fp32_uplink_bytes: int = 0
    fp32_downlink_bytes: int = 0
    #: Bytes by direction and mantissa width, e.g. ``("uplink", 4)``.
    by_bits: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Why each rejected reply was refused ("node <id>: <reason>").
    rejected: list[str] = field(default_factory=list)
    #: Error replies (client-side failures), as "node <id>: <reason>".
    failed: list[str] = field(default_factory=list)
    #: Accepted updates whose norm was clipped (see ``UpdateGuard``).
    clipped: int = 0
    #: ``||w_i - w_ref|| / ||w_ref||`` of each accepted update (before clipping).
    update_norm_ratios: list[float] = field(default_factory=list)

    def count(self, direction: str, bits: int, size: int, fp32_size: int) -> None:
        """Add one message of ``size`` bytes (``fp32_size`` had it travelled in float32)."""
        setattr(self, f"{direction}_bytes", getattr(self, f"{direction}_bytes") + size)
        setattr(
            self, f"fp32_{direction}_bytes", getattr(self, f"fp32_{direction}_bytes") + fp32_size
        )
        self.by_bits[direction, bits] = self.by_bits.get((direction, bits), 0) + size

    def metrics(self) -> dict[str, int | float]:
        """The phase as metrics (the keys ``TRAFFIC_METRICS`` names, plus bytes per width)."""
        values: dict[str, int | float] = {
            "uplink-bytes": self.uplink_bytes,
            "downlink-bytes": self.downlink_bytes,
            "fp32-uplink-bytes": self.fp32_uplink_bytes,
            "fp32-downlink-bytes": self.fp32_downlink_bytes,
            "rejected-replies": len(self.rejected),
            "failed-replies": len(self.failed),
            "clipped-updates": self.clipped,
            "max-update-norm-ratio": max(self.update_norm_ratios, default=0.0),
        }
        for (direction, bits), size in sorted(self.by_bits.items()):
            values[f"{direction}-bytes-{bits}bit"] = size
        return values


#: The metrics every round's phase reports (its aggregate's MetricRecord carries them).
TRAFFIC_METRICS = tuple(PhaseTraffic().metrics())


#: The metrics of bytes per direction and mantissa width, e.g. ``uplink-bytes-4bit``.
WIDTH_METRIC = re.compile(r"(uplink|downlink)-bytes-(\d+)bit")


def width_metric(key: str) -> tuple[str, int] | None:
    """(direction, bits) of a bytes-per-width metric; None for any other key."""
    match = WIDTH_METRIC.fullmatch(key)
    return (match[1], int(match[2])) if match else None


def is_traffic_metric(key: str) -> bool:
    """Whether a metric is one of the wrapper's traffic counts (not a client's metric)."""
    return key in TRAFFIC_METRICS or width_metric(key) is not None


@dataclass
class RoundTraffic:
    """The two phases of one round (the wrapper's log; the metrics carry the same numbers)."""

    train: PhaseTraffic = field(default_factory=PhaseTraffic)
    evaluate: PhaseTraffic = field(default_factory=PhaseTraffic)

    @property
    def uplink_bytes(self) -> int:
        """Bytes of both phases' replies."""
        return self.train.uplink_bytes + self.evaluate.uplink_bytes

    @property
    def downlink_bytes(self) -> int:
        """Bytes of both phases' broadcasts."""
        return self.train.downlink_bytes + self.evaluate.downlink_bytes

    @property
    def fp32_uplink_bytes(self) -> int:
        """``uplink_bytes`` had the models travelled in float32."""
        return self.train.fp32_uplink_bytes + self.evaluate.fp32_uplink_bytes

    @property
    def fp32_downlink_bytes(self) -> int:
        """``downlink_bytes`` had the models travelled in float32."""
        return self.train.fp32_downlink_bytes + self.evaluate.fp32_downlink_bytes

    @property
    def rejected(self) -> list[str]:
        """Rejected replies of both phases."""
        return self.train.rejected + self.evaluate.rejected

    @property
    def failed(self) -> list[str]:
        """Error replies to training messages."""
        return self.train.failed

    @property
    def failed_evaluate(self) -> list[str]:
        """Error replies to evaluation messages."""
        return self.evaluate.failed

    @property
    def clipped(self) -> int:
        """Clipped training updates."""
        return self.train.clipped


class FederationStalledError(RuntimeError):
    """Several rounds in a row brought no acceptable update; the message says why."""


class QuantizedMessages(StrategyWrapper):
    """Low-precision messages around any ``flwr.serverapp.strategy`` strategy.

    Broadcast: the float32 model is encoded at the downlink format (integer mantissas + int8
    exponents; 32 bits = float32); the wrapped strategy samples and configures with the model
    the clients will decode, so stateful strategies (FedAdam, FedYogi, FedAdagrad, FedAvgM)
    take their pseudo-gradient against what the clients trained from. Replies: each is
    validated against the model (names, shapes, dtypes, bit width and blocks of an accepted
    uplink format, packed sizes, finite values, message size, metrics, one reply per node)
    and dequantized to float32; ``guard`` then bounds its claimed weight and its update's
    norm relative to the model the client received, and clips outliers. A bad reply is
    logged and dropped, never aggregated. The wrapped strategy aggregates in float32.

    ``template`` (``lowprec_fl.wire.specs_of(model.state_dict())``) pins the model replies must
    match; without it, the first broadcast's arrays do. ``downlink`` defaults to ``uplink``,
    ``uplink`` to 8-bit mantissas with one exponent per 32 values.

    Clients may train at different widths (``accepted_bits``): a reply may come at any
    accepted width, and a client whose last reply came at a width other than ``uplink``'s
    receives the broadcast at that width (until it has replied, at ``downlink``).

    Each aggregate's MetricRecord carries the phase's traffic (``TRAFFIC_METRICS`` and bytes
    per width) next to the clients' aggregated metrics; ``traffic`` keeps the reasons.
    """

    def __init__(
        self,
        strategy: Strategy,
        template: Mapping[str, TensorSpec] | None = None,
        uplink: BlockFloat = DEFAULT_FORMAT,
        downlink: BlockFloat | None = None,
        accepted_bits: Iterable[int] = (),
        weighting: Weighting = "num-examples",
        float_buffers: Iterable[str] = (),
        max_update_bytes: int | None = None,
        seed: int = 0,
        guard: UpdateGuard | None = None,
        max_failed_rounds: int = 3,
    ) -> None:
        super().__init__(strategy)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.uplink = uplink
        self.downlink = uplink if downlink is None else downlink
        #: Accepted uplink formats by width: ``uplink`` and the same blocks at other widths.
        self.uplink_formats = {uplink.bits: uplink} | {
            int(b): dataclasses.replace(uplink, bits=int(b)) for b in accepted_bits
        }
        self.weighting = weighting
        self.float_buffers = frozenset(float_buffers)
        self._max_update_bytes = max_update_bytes
        self.guard = guard or UpdateGuard()
        if max_failed_rounds < 0:
            raise ValueError(
                f"max_failed_rounds must be >= 0 (0 = never stop), got {max_failed_rounds}"
            )
        self.max_failed_rounds = max_failed_rounds
        #: Training rounds in a row that brought no acceptable update.
        self.failed_rounds = 0
        #: The width of each node's last accepted reply (nodes at another width than
        #: ``uplink`` receive the broadcast at theirs).
        self.node_bits: dict[int, int] = {}
        #: This round's decoded broadcasts by format (what clients trained from), and the
        #: format each node was sent.
        self._references: dict[int, dict[BlockFloat, _Reference]] = {}
        self._sent: dict[int, BlockFloat] = {}
        self.seed = seed
        self.traffic: dict[int, RoundTraffic] = {}
        self.arrayrecord_key: str = getattr(strategy, "arrayrecord_key", "arrays")
        self.weight_key: str = getattr(strategy, "weighted_by_key", WEIGHT_KEY)
        #: The model's tensors (names, shapes, dtypes) that replies must match; None until
        #: given or taken from the first broadcast.
        self.template: dict[str, TensorSpec] | None = None
        if template is not None:
            self._pin_template(template)

    def _pin_template(self, template: Mapping[str, TensorSpec]) -> None:
        """Fix the model replies must match, and the size bounds that follow from it."""
        self.template = dict(template)
        self.max_update_bytes = self._max_update_bytes or payload_limit(self.template)
        self.max_message_bytes = self.max_update_bytes + MESSAGE_SLACK_BYTES
        self._fp32_arrays_bytes = _fp32_record_bytes(self.template, self.arrayrecord_key)

    def _template_from(self, arrays: ArrayRecord) -> None:
        if self.template is None:  # the first broadcast defines the model
            self._pin_template(
                {name: TensorSpec.of(torch.from_numpy(arrays[name].numpy())) for name in arrays}
            )

    @property
    def format_key(self) -> str:
        """Key of the ConfigRecord that describes the arrays' wire format."""
        return self.arrayrecord_key + FORMAT_SUFFIX

    def summary(self) -> None:
        """Log this wrapper's settings, then the wrapped strategy's."""
        widths = sorted(self.uplink_formats)
        log(
            INFO,
            "\t├──> Low precision: uplink %s%s, downlink %s, weighting %s",
            self.uplink.describe(),
            f" (accepted widths {widths})" if len(widths) > 1 else "",
            self.downlink.describe(),
            self.weighting,
        )
        super().summary()

    # ----------------------------------------------------------------- broadcast
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Quantize the model, then let the wrapped strategy sample and configure with it.

        The wrapped strategy is given the model the clients will receive, ``Q(arrays)``
        decoded, not the float32 ``arrays``: its reference is what the clients trained from.
        """
        self._template_from(arrays)
        encoder = _Encoder(self, server_round, "train", arrays)
        reference = _record(encoder.reference(self.downlink).tensors)
        messages = list(self.strategy.configure_train(server_round, reference, config, grid))
        messages = self._replace_content(server_round, "train", messages, encoder)
        for fmt in set(self._sent.values()):  # the guard checks updates against these
            encoder.reference(fmt)
        self._references = {server_round: encoder.references}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Same as ``configure_train`` for federated evaluation."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if not messages:  # e.g. fraction_evaluate=0: nothing to encode
            return messages
        self._template_from(arrays)
        encoder = _Encoder(self, server_round, "evaluate", arrays)
        return self._replace_content(server_round, "evaluate", messages, encoder)

    def round_seed(self, server_round: int, phase: str) -> int:
        """The seed of one round's phase: its broadcast rounding."""
        return (self.seed * 1_000_003 + server_round) * 2 + _PHASE_SEED[phase]

    def downlink_for(self, node: int) -> BlockFloat:
        """The broadcast format for a node: ``downlink``, or the width of its last reply.

        A client that replied at a width other than ``uplink``'s gets the broadcast in its
        own format (with the downlink's rounding); every other client gets ``downlink``.
        """
        bits = self.node_bits.get(node, self.uplink.bits)
        if bits == self.uplink.bits or bits not in self.uplink_formats:
            return self.downlink
        return dataclasses.replace(self.uplink_formats[bits], rounding=self.downlink.rounding)

    def _replace_content(
        self,
        server_round: int,
        phase: str,
        messages: list[Message],
        encoder: _Encoder,
    ) -> list[Message]:
        """Put the encoded model into the wrapped strategy's messages; count the bytes."""
        traffic = self._phase(server_round, phase)
        # Strategies share one content among messages: encode and measure it once per format.
        replaced: dict[tuple[int, BlockFloat], tuple[RecordDict, int, int]] = {}
        self._sent = {}
        for message in messages:
            original = message.content
            node = message.metadata.dst_node_id
            fmt = self.downlink_for(node)
            key = (id(original), fmt)
            if key not in replaced:
                encoded, formats = encoder.encoded(fmt)
                content = RecordDict(dict(original.items()))
                content[self.arrayrecord_key] = encoded
                content[self.format_key] = formats
                replaced[key] = (
                    content,
                    serialized_size(content),
                    serialized_size(original),  # the wrapped strategy's: the model in float32
                )
            content, size, fp32_size = replaced[key]
            message.content = content
            self._sent[node] = fmt
            traffic.count("downlink", fmt.bits, size, fp32_size)
        return messages

    # ----------------------------------------------------------------- updates
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and dequantize replies, then aggregate them with the wrapped strategy.

        Raises ``FederationStalledError`` once ``max_failed_rounds`` rounds in a row brought
        no acceptable update: a run whose clients all fail should stop, not "finish".
        """
        traffic = self._phase(server_round, "train")
        accepted, metrics, weights = self._accept(server_round, "train", replies)
        if not metrics:
            self._no_update(server_round)
            return None, MetricRecord(traffic.metrics())
        reference = self._references.get(server_round, {}).get(self.downlink)
        if reference is not None:
            _anchor_reference(self.strategy, reference.tensors)
        arrays, inner_metrics = self.strategy.aggregate_train(server_round, accepted)
        merged = _merge(inner_metrics, aggregate_metrics(metrics, weights, self.weight_key))
        merged = MetricRecord({**merged, **traffic.metrics()})
        strategy_name = type(self.strategy).__name__
        if arrays is None:
            self._no_update(server_round, f"{strategy_name} aggregated nothing")
            return None, merged
        raw = {name: arrays[name].numpy() for name in arrays}
        broken = [n for n, v in raw.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if broken:  # e.g. a server optimizer that diverged: never broadcast it
            reason = f"the {strategy_name} aggregate has NaN or inf in {broken[:3]}"
            log(WARNING, "Round %d: %s; the global model stays as it was", server_round, reason)
            self._no_update(server_round, reason)
            return None, merged
        self.failed_rounds = 0
        model = {name: self._as_template(name, value) for name, value in raw.items()}
        return ArrayRecord({name: _array(value) for name, value in model.items()}), merged

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate replies' metrics, then aggregate them key by key (see ``metrics``)."""
        traffic = self._phase(server_round, "evaluate")
        accepted, metrics, weights = self._accept(server_round, "evaluate", replies)
        if not metrics:
            sent = traffic.downlink_bytes or traffic.uplink_bytes or traffic.failed
            return MetricRecord(traffic.metrics()) if sent else None
        inner_metrics = self.strategy.aggregate_evaluate(server_round, accepted)
        merged = _merge(inner_metrics, aggregate_metrics(metrics, weights, self.weight_key))
        return MetricRecord({**merged, **traffic.metrics()})

    def state_dict(self) -> dict[str, Any]:
        """``{"failed_rounds": n, "strategy": ...}``: the stall counter survives a resume."""
        return {"failed_rounds": self.failed_rounds, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stall counter and the wrapped strategy's state."""
        # absent in checkpoints of older versions
        failed = nonnegative_int(state.get("failed_rounds", 0), "failed_rounds")
        super().load_state_dict(state)
        self.failed_rounds = failed

    def _no_update(self, server_round: int, reason: str | None = None) -> None:
        self.failed_rounds += 1
        traffic = self._phase(server_round, "train")
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
        self, server_round: int, phase: str, replies: Iterable[Message]
    ) -> tuple[list[Message], list[dict], list[float]]:
        """Replies fit for the wrapped strategy, with their metrics and weights (valid only).

        Accepted replies carry only dequantized float32 arrays (norm-clipped, see
        ``UpdateGuard``) and a MetricRecord with the weight; the full metrics come back
        separately, in the same order as the valid replies (sorted by content).
        """
        with_arrays = phase == "train"
        traffic = self._phase(server_round, phase)
        seen: set[int] = set()
        errors: list[Message] = []
        candidates: list[_Candidate] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors.append(reply)  # the wrapped strategy logs it and skips it
                traffic.failed.append(f"node {node}: {reply.error.reason}")
                continue
            try:
                if self.template is None:
                    raise RejectedUpdateError("no model was broadcast yet: nothing to match")
                size = serialized_size(reply.content)
                fp32 = self._fp32_equivalent(reply.content, with_arrays)
                traffic.count("uplink", self._reply_bits(reply, with_arrays), size, fp32)
                if node in seen:
                    raise RejectedUpdateError(
                        "sent a second reply this round; only the first counts"
                    )
                seen.add(node)
                if size > self.max_message_bytes:
                    raise WireFormatError(
                        f"message of {size} bytes exceeds the limit of {self.max_message_bytes}"
                    )
                candidates.append(self._candidate(reply, with_arrays))
            except Exception as err:  # a bad update must never stop the server
                reason = f"node {node}: {err}"
                traffic.rejected.append(reason)
                log(WARNING, "Round %d: rejected the reply from %s", server_round, reason)
        # Arrival order varies, and node ids change when a run is resumed or redeployed: order
        # by content, so float32 sums (and resumed runs) are reproducible bit for bit.
        candidates.sort(key=lambda c: content_digest(c.reply.content, self.weight_key))
        references = self._references.get(server_round)
        if with_arrays and candidates and references:
            self._guard_norms(server_round, traffic, candidates, references)
        for c in candidates:
            content = RecordDict({METRICS_KEY: MetricRecord({self.weight_key: c.weight})})
            if with_arrays:
                content[self.arrayrecord_key] = _record(c.tensors)
                self.node_bits[c.reply.metadata.src_node_id] = c.bits
            c.reply.content = content
        accepted = [c.reply for c in candidates]
        return (
            errors + accepted,
            [c.metrics for c in candidates],
            [float(c.weight) for c in candidates],
        )

    def _guard_norms(
        self,
        server_round: int,
        traffic: PhaseTraffic,
        candidates: list[_Candidate],
        references: Mapping[BlockFloat, _Reference],
    ) -> None:
        """Check and clip each update against the broadcast its client received."""
        kept = []
        for c in candidates:
            sent = self._sent.get(c.reply.metadata.src_node_id, self.downlink)
            reference = references.get(sent) or references[self.downlink]
            try:
                self.guard.check_buffers(c.tensors, reference.tensors)
                c.norm = self.guard.check_norm(c.tensors, reference.tensors, reference.norm)
            except Exception as err:
                reason = f"node {c.reply.metadata.src_node_id}: {err}"
                traffic.rejected.append(reason)
                log(WARNING, "Round %d: rejected the reply from %s", server_round, reason)
                continue
            c.reference = reference
            kept.append(c)
        candidates[:] = kept
        checked = candidates
        traffic.update_norm_ratios = [c.norm / max(c.reference.norm, 1e-12) for c in checked]
        threshold = self.guard.clip_threshold([c.norm for c in checked])
        for c in checked:
            clipped = self.guard.clip(c.tensors, c.reference.tensors, c.norm, threshold)
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

    def _reply_bits(self, reply: Message, with_arrays: bool) -> int:
        """The width a reply's model claims (for its byte count): the uplink's if unclear."""
        formats = reply.content.config_records.get(self.format_key)
        if not with_arrays or len(self.uplink_formats) == 1 or formats is None:
            return self.uplink.bits
        try:
            return message_format(formats, self.uplink_formats).bits
        except WireFormatError:
            return self.uplink.bits

    def _candidate(self, reply: Message, with_arrays: bool) -> _Candidate:
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
        fmt = self.uplink
        if len(self.uplink_formats) > 1:
            fmt = message_format(formats, self.uplink_formats)
        candidate.tensors = decode_tensors(
            array_records[self.arrayrecord_key],
            formats,
            expected=self.template,
            fmt=fmt,
            allow_float=self.float_buffers,
            max_bytes=self.max_update_bytes,
        )
        candidate.bits = fmt.bits
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

    def _phase(self, server_round: int, phase: str) -> PhaseTraffic:
        return getattr(self.traffic.setdefault(server_round, RoundTraffic()), phase)


class _Encoder:
    """One phase's broadcast: the model encoded (and decoded) once per width it is sent at."""

    def __init__(
        self, owner: QuantizedMessages, server_round: int, phase: str, arrays: ArrayRecord
    ) -> None:
        self.owner = owner
        self.seed = owner.round_seed(server_round, phase)
        self.tensors = {
            name: torch.from_numpy(owner._as_template(name, arrays[name].numpy()))
            for name in arrays
        }
        self._encoded: dict[BlockFloat, tuple[ArrayRecord, ConfigRecord]] = {}
        self.references: dict[BlockFloat, _Reference] = {}

    def encoded(self, fmt: BlockFloat) -> tuple[ArrayRecord, ConfigRecord]:
        """The model at the broadcast format ``fmt``: (arrays, format record)."""
        if fmt not in self._encoded:
            # The downlink's rounding keys stay those of a single-width run; other widths
            # draw from their own stream.
            seed = self.seed if fmt == self.owner.downlink else self.seed * 64 + fmt.bits
            generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
            self._encoded[fmt] = encode_tensors(
                self.tensors, fmt, generator, keep_float=self.owner.float_buffers
            )
        return self._encoded[fmt]

    def reference(self, fmt: BlockFloat) -> _Reference:
        """What the broadcast at ``fmt`` decodes to: the model its clients train from."""
        if fmt not in self.references:
            decoded = decode_tensors(*self.encoded(fmt))
            self.references[fmt] = _Reference(decoded, model_norm(decoded))
        return self.references[fmt]


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
    bits: int = 0
    reference: _Reference | None = None


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
    fedavgm = find_wrapper(strategy, FedAvgM)
    if fedavgm is not None:
        fedavgm.current_arrays = _record(reference)


def _array(value: np.ndarray) -> Array:
    # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
    return Array(np.asarray(value, order="C"))


def _fp32_record_bytes(template: Mapping[str, TensorSpec], key: str) -> int:
    """Serialized size of the model as a plain float32 ArrayRecord under ``key``."""
    zeros = {name: torch.zeros(spec.shape, dtype=spec.dtype) for name, spec in template.items()}
    return float32_size(zeros, key)
