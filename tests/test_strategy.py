"""LowPrecisionStrategy: quantized broadcast, validated float32 aggregation, moving average."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.mod import message_size_mod
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf

from client_app.app import app as client_app
from lowprec_fl.protocol import LINEAGE_KEY
from lowprec_fl.task.config import load_config
from lowprec_fl.task.model import build_configured_model, float_buffer_names
from lowprec_fl.wire import (
    TensorSpec,
    decode_tensors,
    encode_tensors,
    specs_of,
)
from quantization import FP32, BlockFloat, quantize
from strategies import LowPrecisionStrategy, ServerMovingAverage, is_traffic_metric
from strategies.factory import build_strategy
from strategies.quantized_messages import content_digest
from tests.flower_harness import InProcessGrid
from tests.shared_helpers import with_item

NODES = [11, 12, 13, 14]
FLOAT_BUFFERS = frozenset({"bn.running_var"})
UPLINK_BITS = 4
DOWNLINK = BlockFloat(8, layout="auto")


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("flower_task")


class FakeGrid:
    """Just enough of a Grid for ``configure_train``: the connected node ids."""

    def __init__(self, nodes=NODES) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        """Answer the strategy's partition-id queries (partition = position in ``nodes``)."""
        replies = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"q{i}"
            partition = self.nodes.index(message.metadata.dst_node_id)
            reply = Message(
                RecordDict({"metrics": MetricRecord({"partition-id": partition})}),
                reply_to=message,
            )
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            replies.append(reply)
        return replies


def _template() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "fc.weight": torch.randn(3, 8, generator=g),
        "fc.bias": torch.randn(3, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(10),
    }


def _float_template() -> dict[str, torch.Tensor]:
    return {k: v for k, v in _template().items() if v.is_floating_point()}


def _client_state(node: int, template=None) -> dict[str, torch.Tensor]:
    """A client's trained model: the template plus a node-specific perturbation."""
    template = _template() if template is None else template
    g = torch.Generator().manual_seed(node)
    state = {}
    for name, t in template.items():
        if t.is_floating_point():
            state[name] = t + 0.1 * torch.randn(t.shape, generator=g)
        else:
            state[name] = t + node  # e.g. num_batches_tracked grows
    return state


def _initial(template: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.numpy()) for k, v in template.items()})


def _strategy(
    template=None,
    uplink_bits: int = UPLINK_BITS,
    downlink: BlockFloat = DOWNLINK,
    inner=None,
    **kwargs,
) -> LowPrecisionStrategy:
    template = _template() if template is None else template
    return LowPrecisionStrategy(
        inner=inner or FedAvg(fraction_train=1.0, min_available_nodes=1),
        template=specs_of(template),
        uplink=BlockFloat(uplink_bits, layout="auto") if uplink_bits < 32 else FP32,
        downlink=downlink,
        float_buffers=FLOAT_BUFFERS & set(template),
        **kwargs,
    )


def _requests(strategy: LowPrecisionStrategy, server_round: int = 1, template=None):
    template = _template() if template is None else template
    messages = list(
        strategy.configure_train(server_round, _initial(template), ConfigRecord(), FakeGrid())
    )
    for m in messages:  # a Grid assigns ids when it pushes
        m.metadata.__dict__["_message_id"] = f"request-{m.metadata.dst_node_id}"
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _reply(request: Message, content: RecordDict) -> Message:
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = request.metadata.dst_node_id
    return reply


def _content(
    state: Mapping[str, torch.Tensor],
    num_examples=10,
    bits: int = UPLINK_BITS,
    seed: int = 0,
    metrics: dict | None = None,
) -> RecordDict:
    fmt = FP32 if bits == 32 else BlockFloat(bits, layout="auto")
    arrays, formats = encode_tensors(
        state, fmt, torch.Generator().manual_seed(seed), keep_float=FLOAT_BUFFERS
    )
    values = {"num-examples": num_examples, "train-loss": 1.0 + seed}
    if metrics is not None:
        values = metrics
    return RecordDict({"arrays": arrays, "arrays-format": formats, "metrics": MetricRecord(values)})


def _decoded(content: RecordDict, template=None, bits: int = UPLINK_BITS) -> dict:
    template = _template() if template is None else template
    tensors = decode_tensors(
        content["arrays"],
        content["arrays-format"],
        expected=specs_of(template),
        bits=bits,
        allow_float=FLOAT_BUFFERS,
    )
    return {k: v.numpy().astype(np.float64) for k, v in tensors.items()}


def _weighted_mean(models: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        name: sum(m[name] * (w / total) for m, w in zip(models, weights, strict=True))
        for name in models[0]
    }


def _assert_model_close(arrays: ArrayRecord, expected: Mapping[str, np.ndarray], template):
    assert set(arrays.keys()) == set(template)
    for name, t in template.items():
        got = arrays[name].numpy()
        if t.is_floating_point():
            assert got.dtype == np.float32, name
            np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert got.dtype == np.int64, name
            np.testing.assert_array_equal(got, np.rint(expected[name]), err_msg=name)


def _content_bytes(message: Message) -> int:
    """Bytes of a message's content on the wire, measured independently of ``lowprec_fl.wire``.

    The whole Message is serialized to protobuf bytes and parsed back, as Flower's transport
    does; the length of the content field's serialization is returned.
    """
    wire = message_to_proto(message).SerializeToString()
    return len(ProtoMessage.FromString(wire).content.SerializeToString())


def _record_dict_bytes(records: dict) -> int:
    """Serialized protobuf length of a RecordDict built from ``records``."""
    return len(recorddict_to_proto(RecordDict(records)).SerializeToString())


def _float32_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The tensors as a plain ArrayRecord: floats as float32, integer buffers as they are."""
    return ArrayRecord(
        {
            name: Array(t.numpy().astype(np.float32) if t.is_floating_point() else t.numpy())
            for name, t in tensors.items()
        }
    )


# ----------------------------------------------------------------------------- broadcast
@pytest.mark.parametrize("bits", [8, 4])
def test_configure_train_broadcasts_quantized_arrays(bits):
    template = _template()
    downlink = BlockFloat(bits, layout="auto")
    strategy = _strategy(template, downlink=downlink)
    config = ConfigRecord({"lr": 0.01})
    messages = list(strategy.configure_train(1, _initial(template), config, FakeGrid()))

    assert sorted(m.metadata.dst_node_id for m in messages) == NODES
    content = messages[0].content
    assert set(content.keys()) == {"arrays", "arrays-format", "config"}
    arrays, formats = content["arrays"], content["arrays-format"]
    for name, t in template.items():
        description = json.loads(formats[name])
        assert tuple(description["shape"]) == tuple(t.shape)
        if name in FLOAT_BUFFERS:
            assert arrays[name].numpy().dtype == np.float32
            assert "bits" not in description
        elif not t.is_floating_point():
            assert arrays[name].numpy().dtype == np.int64
            assert "bits" not in description
        else:
            mantissas = arrays[name].numpy()
            assert mantissas.dtype == (np.int8 if bits == 8 else np.uint8)
            assert mantissas.size == (t.numel() * bits + 7) // 8
            assert arrays[name + "::exponents"].numpy().dtype == np.int8
            assert description["bits"] == bits
    # The config record travels unchanged, plus Flower's server-round and the run lineage.
    sent_config = content["config"]
    assert sent_config["lr"] == 0.01 and sent_config["server-round"] == 1
    assert sent_config[LINEAGE_KEY] == strategy.lineage and len(strategy.lineage) == 32
    assert "server-round" not in config  # the caller's record is not modified

    # Clients decode it at the downlink width; values are on the grid and near the model.
    decoded = decode_tensors(
        arrays, formats, expected=specs_of(template), bits=bits, allow_float=FLOAT_BUFFERS
    )
    nearest = BlockFloat(bits, layout="auto", rounding="nearest")
    for name, t in template.items():
        if t.is_floating_point() and name not in FLOAT_BUFFERS:
            assert torch.equal(quantize(decoded[name], nearest), decoded[name])
            step = 2.0 ** (math.floor(math.log2(t.abs().max())) - bits + 2)
            assert (decoded[name] - t).abs().max() <= step
        else:
            assert torch.equal(decoded[name], t)

    # Traffic: what is sent, per message, and its float32 equivalent, measured here.
    traffic = strategy.traffic[1]
    sizes = [_content_bytes(m) for m in messages]
    assert len(set(sizes)) == 1
    assert traffic.downlink_bytes == sum(sizes)
    fp32_bytes = _record_dict_bytes({"arrays": _float32_record(template), "config": sent_config})
    assert traffic.fp32_downlink_bytes == len(NODES) * fp32_bytes


def test_configure_train_fp32_downlink_sends_float32():
    template = _template()
    strategy = _strategy(template, downlink=FP32)
    messages = list(strategy.configure_train(1, _initial(template), ConfigRecord(), FakeGrid()))
    arrays = messages[0].content["arrays"]
    assert set(arrays.keys()) == set(template)
    for name, t in template.items():
        np.testing.assert_array_equal(arrays[name].numpy(), t.numpy())
        assert arrays[name].numpy().dtype == t.numpy().dtype
    assert strategy.traffic[1].downlink_bytes == sum(_content_bytes(m) for m in messages)
    # The float32 equivalent: the model as the inner strategy sends it, without a format record.
    config = messages[0].content["config"]
    fp32_bytes = _record_dict_bytes({"arrays": _float32_record(template), "config": config})
    assert strategy.traffic[1].fp32_downlink_bytes == len(NODES) * fp32_bytes


def test_configure_train_keeps_config_and_fedprox_mu():
    cfg = load_config({"overrides": "dataset=synthetic model=small_cnn strategy=fedprox"})
    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    config = ConfigRecord({"lr": 0.05, "local-epochs": 1})

    messages = list(strategy.configure_train(3, _initial(template), config, FakeGrid()))

    assert len(messages) == int(len(NODES) * cfg.federation.fraction_train)
    for m in messages:
        sent = m.content["config"]
        assert sent["lr"] == 0.05 and sent["local-epochs"] == 1
        assert sent["server-round"] == 3
        assert sent["proximal-mu"] == pytest.approx(cfg.strategy.proximal_mu)
        assert m.content["arrays"]["classifier.weight"].numpy().dtype == np.int8


# ----------------------------------------------------------------------------- aggregation
def _aggregate_handmade(strategy, weights, template=None, bits=UPLINK_BITS):
    template = _template() if template is None else template
    requests = _requests(strategy, template=template)
    contents = [
        _content(_client_state(r.metadata.dst_node_id, template), w, bits=bits, seed=i)
        for i, (r, w) in enumerate(zip(requests, weights, strict=False))
    ]
    models = [_decoded(c, template, bits) for c in contents]
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=False)]
    return strategy.aggregate_train(1, replies), models


def test_aggregate_train_is_the_weighted_average_of_decoded_updates():
    template = _template()
    strategy = _strategy(template)
    weights = [10, 30, 5, 55]
    (arrays, metrics), models = _aggregate_handmade(strategy, weights, template)

    _assert_model_close(arrays, _weighted_mean(models, weights), template)
    expected_loss = sum(w * (1.0 + i) for i, w in enumerate(weights)) / sum(weights)
    assert metrics["train-loss"] == pytest.approx(expected_loss)
    assert strategy.traffic[1].rejected == []


def test_aggregate_train_uniform_weighting_is_the_plain_mean():
    template = _template()
    strategy = _strategy(template, weighting="uniform")
    weights = [10, 30, 5, 55]
    (arrays, _), models = _aggregate_handmade(strategy, weights, template)

    plain = _weighted_mean(models, [1, 1, 1, 1])
    _assert_model_close(arrays, plain, template)
    weighted = _weighted_mean(models, weights)
    assert not np.allclose(weighted["fc.weight"], plain["fc.weight"])


def test_aggregate_train_records_uplink_traffic():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    states = [_client_state(r.metadata.dst_node_id) for r in requests]
    replies = [_reply(r, _content(state)) for r, state in zip(requests, states, strict=True)]
    sent = sum(_content_bytes(r) for r in replies)
    # the same replies with the model as a plain float32 ArrayRecord and no format record
    fp32 = sum(
        _record_dict_bytes({"metrics": r.content["metrics"], "arrays": _float32_record(state)})
        for r, state in zip(replies, states, strict=True)
    )

    strategy.aggregate_train(1, replies)

    traffic = strategy.traffic[1]
    assert traffic.uplink_bytes == sent
    assert traffic.fp32_uplink_bytes == fp32


def _over_the_wire(message: Message) -> tuple[Message, int]:
    """The message as its receiver gets it after protobuf serialization, and its content bytes."""
    wire = message_to_proto(message).SerializeToString()
    proto = ProtoMessage.FromString(wire)
    return message_from_proto(proto), len(proto.content.SerializeToString())


#: Protobuf framing that ``count_bytes`` leaves out (it counts keys and values' bytes), for
#: these messages (tensors under 2 MB, dims under 16384, at most 4 of them). An Array entry:
#: item, value and data tags with length varints (4 + 4 + 4), the key's tag and length (2), its
#: dtype (2 + up to 7), shape (2 + 4 x 2) and stype ("numpy.ndarray": 2 + 13): at most 50.
ARRAY_ENTRY_FRAMING = 50
#: A ConfigRecord or MetricRecord entry: item, key, value and scalar tags and lengths.
SCALAR_ENTRY_FRAMING = 12
#: One record in the RecordDict: item tag and length, its key (not counted), record tag and length.
RECORD_FRAMING = 10 + len("arrays-format")


def _framing_bound(content: RecordDict) -> int:
    arrays = sum(len(r) for r in content.array_records.values())
    scalars = sum(len(r) for r in content.values()) - arrays
    return (
        ARRAY_ENTRY_FRAMING * arrays
        + SCALAR_ENTRY_FRAMING * scalars
        + RECORD_FRAMING * len(content)
    )


def _logged_sizes(caplog, direction: str) -> list[int]:
    pattern = re.compile(rf"{direction} message size: (\d+) bytes")
    return [int(m[1]) for r in caplog.records if (m := pattern.fullmatch(r.getMessage()))]


def test_traffic_matches_serialized_messages_and_flowers_message_size_mod(caplog):
    """Round traffic against two measures that do not use ``lowprec_fl.wire``: the protobuf
    bytes of every message sent through a serialize/parse round trip (exact), and the sizes
    Flower's ``message_size_mod`` logs on the client (the records' bytes without protobuf's
    framing, so the counts exceed them by at most the framing of each entry)."""
    run_config = {
        "overrides": "dataset=synthetic model=small_cnn train.max_steps=1 "
        "federation.num_clients=4 federation.fraction_train=0.75"
    }
    cfg = load_config(run_config)
    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    measured: dict[str, list[int]] = {"down": [], "up": []}
    bounds: dict[str, list[int]] = {"down": [], "up": []}

    def client_over_the_wire(message: Message, context) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:  # the partition-id queries
            return client_app(message, context)
        received, down = _over_the_wire(message)
        reply = message_size_mod(received, context, client_app)
        sent, up = _over_the_wire(reply)
        for key, size, m in (("down", down, received), ("up", up, sent)):
            measured[key].append(size)
            bounds[key].append(_framing_bound(m.content))
        return sent

    grid = InProcessGrid(client_over_the_wire, 4, run_config)
    messages = list(strategy.configure_train(1, _initial(template), ConfigRecord(), grid))
    with caplog.at_level(logging.INFO, logger="flwr"):
        replies = list(grid.send_and_receive(messages))
    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None and len(replies) == 3
    traffic = strategy.traffic[1]
    assert traffic.rejected == [] and traffic.failed == []
    assert traffic.downlink_bytes == sum(measured["down"])
    assert traffic.uplink_bytes == sum(measured["up"])
    for direction, key in (("Incoming", "down"), ("Outgoing", "up")):
        logged = _logged_sizes(caplog, direction)
        assert len(logged) == 3, direction
        for flower, ours, bound in zip(logged, measured[key], bounds[key], strict=True):
            assert 0 < ours - flower <= bound, (direction, ours, flower, bound)
    # What travelled is far below the float32 model (8-bit mantissas and shared exponents).
    fp32_model = _record_dict_bytes({"arrays": _float32_record(template)})
    assert traffic.uplink_bytes < 0.3 * 3 * fp32_model
    assert traffic.downlink_bytes < 0.3 * 3 * fp32_model


def test_fp32_wrapper_equals_plain_fedavg_exactly():
    template = _float_template()
    strategy = _strategy(template, uplink_bits=32, downlink=FP32)
    assert not strategy.moving_average.enabled
    requests = _requests(strategy, template=template)
    weights = [3, 7, 11, 13]
    states = [_client_state(r.metadata.dst_node_id, template) for r in requests]
    ours = [
        _reply(r, _content(s, w, bits=32, seed=i))
        for i, (r, s, w) in enumerate(zip(requests, states, weights, strict=True))
    ]
    plain = [
        _reply(
            r,
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in s.items()}),
                    "metrics": MetricRecord({"num-examples": w, "train-loss": 1.0 + i}),
                }
            ),
        )
        for i, (r, s, w) in enumerate(zip(requests, states, weights, strict=True))
    ]

    # the wrapper sums in the order of the replies' content digests (reproducible whatever the
    # node ids); plain FedAvg sums in the order it is given: give it the same one
    order = sorted(range(len(ours)), key=lambda i: content_digest(ours[i].content))
    arrays, metrics = strategy.aggregate_train(1, ours)
    ref_arrays, ref_metrics = FedAvg().aggregate_train(1, [plain[i] for i in order])

    assert list(arrays.keys()) == list(ref_arrays.keys())
    for name in ref_arrays:
        assert arrays[name].numpy().dtype == ref_arrays[name].numpy().dtype == np.float32
        assert np.array_equal(arrays[name].numpy(), ref_arrays[name].numpy()), name
    # metrics: the wrapper averages each key with math.fsum (correctly rounded, so independent
    # of order); Flower adds v * (w / total) left to right, within a few ulps of it
    client_metrics = {k: v for k, v in metrics.items() if not is_traffic_metric(k)}
    assert client_metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-14, abs=0), key


def test_aggregate_train_on_real_client_app_replies():
    run_config = {
        "overrides": "dataset=synthetic model=small_cnn train.max_steps=0 train.batch_size=64 "
        "federation.num_clients=3 federation.fraction_train=1.0 partition.scheme=dirichlet "
        "partition.alpha=1.0 server.moving_average=0"
    }
    cfg = load_config(run_config)
    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    grid = InProcessGrid(client_app, 3, run_config)

    messages = strategy.configure_train(1, _initial(template), ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))

    weights = [r.content["metrics"]["num-examples"] for r in replies]
    assert len(set(weights)) == 3, weights  # unequal partitions: weighting matters
    bits = int(cfg.quantization.uplink_bits)
    models = [
        {
            k: v.numpy().astype(np.float64)
            for k, v in decode_tensors(
                r.content["arrays"], r.content["arrays-format"], specs_of(template), bits
            ).items()
        }
        for r in replies
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert strategy.traffic[1].rejected == []
    _assert_model_close(arrays, _weighted_mean(models, weights), template)
    assert math.isfinite(metrics["train-loss"])


# ----------------------------------------------------------------------------- bad replies
def _swap(content: RecordDict, key: str, value) -> RecordDict:
    items = dict(content.items())
    if value is None:
        del items[key]
    else:
        items[key] = value
    return RecordDict(items)


def _edit_arrays(content: RecordDict, **edits) -> RecordDict:
    arrays = content["arrays"]
    for key, value in edits.items():
        arrays = with_item(arrays, key.replace("__", "."), value)
    return _swap(content, "arrays", arrays)


def _edit_format(content: RecordDict, name: str, value) -> RecordDict:
    return _swap(content, "arrays-format", with_item(content["arrays-format"], name, value))


def _missing_key(c):
    c = _edit_arrays(c, fc__bias=None)
    c = _swap(c, "arrays", with_item(c["arrays"], "fc.bias::exponents", None))
    return _edit_format(c, "fc.bias", None)


def _extra_key(c):
    c = _edit_arrays(c, extra=Array(np.zeros(3, np.float32)))
    return _edit_format(c, "extra", json.dumps({"shape": [3]}))


def _wrong_shape(c):
    state = _client_state(99)
    state["fc.bias"] = torch.randn(4)
    return _content(state)


def _wrong_dtype(c):
    return _edit_arrays(c, bn__num_batches_tracked=Array(np.array(20, np.int32)))


def _float64_buffer(c):
    return _edit_arrays(c, bn__running_var=Array(np.ones(4, np.float64)))


def _truncated(c):
    packed = c["arrays"]["conv.weight"].numpy()
    return _edit_arrays(c, conv__weight=Array(packed[:-1].copy()))


def _nan_buffer(c):
    return _edit_arrays(c, bn__running_var=Array(np.array([1, np.nan, 1, 1], np.float32)))


def _inf_buffer(c):
    return _edit_arrays(c, bn__running_var=Array(np.array([1, np.inf, 1, 1], np.float32)))


def _inf_from_codes(c):
    # 4-bit code -8 (packed 0x88) with exponent 127 decodes to -2^128 = -inf in float32.
    c = _edit_arrays(c, fc__bias=Array(np.array([0x88, 0x08], np.uint8)))
    return _swap(c, "arrays", with_item(c["arrays"], "fc.bias::exponents", Array(np.int8([127]))))


def _oversized(c):
    return _edit_arrays(c, padding=Array(np.zeros(1 << 16, np.uint8)))


def _metrics(values):
    return lambda c: _swap(c, "metrics", MetricRecord(values))


def _two_metric_records(c):
    return _swap(c, "more-metrics", MetricRecord({"num-examples": 5}))


def _no_metrics(c):
    return _swap(c, "metrics", None)


def _no_format(c):
    return _swap(c, "arrays-format", None)


def _no_arrays(c):
    return _swap(c, "arrays", None)


def _two_array_records(c):
    return _swap(c, "other", ArrayRecord({"x": Array(np.zeros(1, np.float32))}))


def _renamed_arrays(c):
    c = _swap(c, "weights", c["arrays"])
    return _swap(c, "arrays", None)


def _malformed_format(c):
    return _edit_format(c, "fc.bias", "{not json")


def _int_buffer_quantized(c):
    q_arrays, q_formats = encode_tensors(
        {"bn.num_batches_tracked": torch.tensor(20.0)}, BlockFloat(UPLINK_BITS)
    )
    c = _swap(c, "arrays", ArrayRecord({**dict(c["arrays"].items()), **dict(q_arrays.items())}))
    return _edit_format(c, "bn.num_batches_tracked", q_formats["bn.num_batches_tracked"])


BAD_REPLIES: dict[str, tuple[Callable[[RecordDict], RecordDict], str]] = {
    "missing key": (_missing_key, r"missing \['fc.bias'\]"),
    "extra key": (_extra_key, r"extra \['extra'\]"),
    "wrong shape": (_wrong_shape, r"'fc.bias' has shape \(4,\), expected \(3,\)"),
    "wrong int dtype": (_wrong_dtype, "has dtype int32, expected torch.int64"),
    "float64 buffer": (_float64_buffer, "floats travel as float32"),
    "int buffer quantized": (_int_buffer_quantized, "must travel unquantized"),
    "truncated packed bytes": (_truncated, "mantissas hold 35 values"),
    "wrong bits": (lambda c: _content(_client_state(99), bits=8), "8-bit mantissas, expected 4"),
    "float32 weights": (lambda c: _content(_client_state(99), bits=32), "is float32, expected 4"),
    "nan": (_nan_buffer, "contains NaN or inf"),
    "inf": (_inf_buffer, "contains NaN or inf"),
    "inf from valid codes": (_inf_from_codes, "'fc.bias' contains NaN or inf"),
    "oversized payload": (_oversized, "exceeds the limit"),
    "malformed format": (_malformed_format, "format of 'fc.bias' is malformed"),
    "missing num-examples": (_metrics({"train-loss": 1.0}), "'num-examples' is missing"),
    "zero num-examples": (_metrics({"num-examples": 0}), "must be in \\(0, "),
    "negative num-examples": (_metrics({"num-examples": -5}), "must be in \\(0, "),
    "nan num-examples": (_metrics({"num-examples": float("nan")}), "num-examples. is not finite"),
    "inf num-examples": (_metrics({"num-examples": float("inf")}), "num-examples. is not finite"),
    "list num-examples": (_metrics({"num-examples": [1, 2]}), "missing or not a number"),
    "non-finite metric": (_metrics({"num-examples": 5, "train-loss": float("inf")}), "finite"),
    "two metric records": (_two_metric_records, "expected one MetricRecord, got 2"),
    "no metric record": (_no_metrics, "expected one MetricRecord, got 0"),
    "missing arrays-format": (_no_format, "'arrays-format' is missing"),
    "no array record": (_no_arrays, "expected one ArrayRecord 'arrays'"),
    "two array records": (_two_array_records, "expected one ArrayRecord 'arrays'"),
    "renamed array record": (_renamed_arrays, "expected one ArrayRecord 'arrays'"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_is_dropped_and_logged(case, caplog):
    mutate, reason = BAD_REPLIES[case]
    template = _template()
    good_payload = _content(_client_state(1)).get("arrays").count_bytes()
    strategy = _strategy(template, max_update_bytes=4 * good_payload)
    requests = _requests(strategy, template=template)
    bad_node = requests[1].metadata.dst_node_id
    weights = [10, 20, 30, 40]
    contents = [
        _content(_client_state(r.metadata.dst_node_id), w, seed=i)
        for i, (r, w) in enumerate(zip(requests, weights, strict=True))
    ]
    good = [0, 2, 3]
    models = [_decoded(contents[i]) for i in good]
    contents[1] = mutate(contents[1])
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=True)]

    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)

    rejected = strategy.traffic[1].rejected
    assert len(rejected) == 1, rejected
    assert rejected[0].startswith(f"node {bad_node}: ")
    assert re.search(reason, rejected[0]), rejected[0]
    assert any(
        r.levelno == logging.WARNING and f"node {bad_node}" in r.getMessage()
        for r in caplog.records
    )
    _assert_model_close(arrays, _weighted_mean(models, [weights[i] for i in good]), template)
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0 + 40 * 4.0) / 80)


def test_error_reply_is_skipped():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    weights = [10, 20, 30]
    contents = [
        _content(_client_state(r.metadata.dst_node_id), w, seed=i)
        for i, (r, w) in enumerate(zip(requests[:3], weights, strict=True))
    ]
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=False)]
    failed = Message(Error(code=0, reason="client crashed"), reply_to=requests[3])
    failed.metadata.__dict__["_src_node_id"] = requests[3].metadata.dst_node_id
    replies.append(failed)

    arrays, _ = strategy.aggregate_train(1, replies)

    _assert_model_close(arrays, _weighted_mean([_decoded(c) for c in contents], weights), template)
    assert strategy.traffic[1].rejected == []


def test_all_replies_bad_returns_none():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    replies = [
        _reply(requests[0], _no_format(_content(_client_state(1)))),
        _reply(requests[1], _metrics({"num-examples": 0})(_content(_client_state(2)))),
        _reply(requests[2], _nan_buffer(_content(_client_state(3)))),
    ]
    failed = Message(Error(code=0, reason="boom"), reply_to=requests[3])
    failed.metadata.__dict__["_src_node_id"] = requests[3].metadata.dst_node_id
    replies.append(failed)

    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and len(strategy.traffic[1].rejected) == 3
    assert metrics["rejected-replies"] == 3 and metrics["failed-replies"] == 1  # the counts
    assert not any(not is_traffic_metric(key) for key in metrics)  # and nothing else
    arrays, metrics = strategy.aggregate_train(2, [])
    assert arrays is None and metrics["uplink-bytes"] == 0


def test_aggregate_evaluate_drops_bad_metrics():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    replies = [
        _reply(requests[0], RecordDict({"m": MetricRecord({"num-examples": 10, "acc": 0.5})})),
        _reply(requests[1], RecordDict({"m": MetricRecord({"num-examples": 30, "acc": 0.9})})),
        _reply(requests[2], RecordDict({"m": MetricRecord({"num-examples": 0, "acc": 0.0})})),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["acc"] == pytest.approx(0.8)
    assert len(strategy.traffic[1].rejected) == 1


def test_infinity_in_reply_format_is_dropped():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    contents = [_content(_client_state(r.metadata.dst_node_id)) for r in requests]
    description = json.loads(contents[1]["arrays-format"]["fc.bias"])
    description["shape"] = [float("inf")]
    contents[1] = _edit_format(contents[1], "fc.bias", json.dumps(description))
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=True)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert len(strategy.traffic[1].rejected) == 1


@pytest.mark.parametrize("variant", ["extra metric", "renamed record"])
def test_reply_with_different_metric_keys_does_not_crash(variant):
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)
    contents = [_content(_client_state(r.metadata.dst_node_id)) for r in requests]
    if variant == "extra metric":
        contents[1] = _metrics({"num-examples": 10, "train-loss": 1.0, "extra": 2.0})(contents[1])
    else:
        contents[1] = _swap(contents[1], "client-metrics", contents[1]["metrics"])
        contents[1] = _swap(contents[1], "metrics", None)
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=True)]

    arrays, _ = strategy.aggregate_train(1, replies)  # raises today

    assert arrays is not None


def test_huge_num_examples_do_not_zero_the_model():
    template = _float_template()
    strategy = _strategy(template)
    requests = _requests(strategy, template=template)[:2]
    contents = [
        _content(_client_state(r.metadata.dst_node_id, template), 1e308, seed=i)
        for i, r in enumerate(requests)
    ]
    models = [_decoded(c, template) for c in contents]
    replies = [_reply(r, c) for r, c in zip(requests, contents, strict=True)]

    arrays, _ = strategy.aggregate_train(1, replies)

    # Either reject the implausible weights, or average correctly - never a zero model.
    if arrays is not None:
        _assert_model_close(arrays, _weighted_mean(models, [1, 1]), template)


# ----------------------------------------------------------------------------- moving average
def _model(value: float, count: int = 1) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, np.float32),
        "n": np.array(count, np.int64),
    }


def test_moving_average_decay_zero_passes_through():
    ma = ServerMovingAverage(FedAvg(), decay=0.0)
    assert not ma.enabled
    for r, v in enumerate([1.0, 5.0, -2.0], start=1):
        out = ma.update(r, _model(v, r))
        np.testing.assert_array_equal(out["w"], _model(v)["w"])
        assert int(out["n"]) == r


def test_moving_average_from_round_one():
    ma = ServerMovingAverage(FedAvg(), decay=0.9, start_round=1, warmup=False)
    w1, w2, w3 = _model(1.0), _model(2.0), _model(4.0)
    np.testing.assert_array_equal(ma.update(1, w1)["w"], w1["w"])  # first model is the average
    out2 = ma.update(2, w2)
    np.testing.assert_allclose(out2["w"], 0.9 * 1.0 + 0.1 * 2.0, rtol=1e-6)
    assert out2["w"].dtype == np.float32
    out3 = ma.update(3, w3)
    np.testing.assert_allclose(out3["w"], 0.9 * (0.9 + 0.2) + 0.1 * 4.0, rtol=1e-6)


def test_moving_average_start_round():
    ma = ServerMovingAverage(FedAvg(), decay=0.9, start_round=3, warmup=False)
    for r, v in [(1, 1.0), (2, 2.0)]:
        np.testing.assert_array_equal(ma.update(r, _model(v))["w"], _model(v)["w"])
    assert ma.average is None
    np.testing.assert_array_equal(ma.update(3, _model(3.0))["w"], _model(3.0)["w"])
    out = ma.update(4, _model(5.0))
    np.testing.assert_allclose(out["w"], 0.9 * 3.0 + 0.1 * 5.0, rtol=1e-6)


def test_moving_average_warmup():
    ma = ServerMovingAverage(FedAvg(), decay=0.9, warmup=True)
    expected = 7.0
    ma.update(1, _model(expected))
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        lam = min(0.9, (1 + n) / (10 + n))
        assert ma.decay_at(n) == pytest.approx(lam)
        value = float(rng.normal())
        expected = lam * expected + (1 - lam) * value
        out = ma.update(n + 1, _model(value))
        np.testing.assert_allclose(out["w"], expected, rtol=1e-5, atol=1e-6)
    assert ma.decay_at(1) == pytest.approx(2 / 11) and ma.decay_at(100) == 0.9


def test_moving_average_int_buffers_take_newest_value():
    ma = ServerMovingAverage(FedAvg(), decay=0.9, warmup=False)
    ma.update(1, _model(1.0, count=100))
    out = ma.update(2, _model(2.0, count=7))
    assert out["n"].dtype == np.int64 and int(out["n"]) == 7
    assert float(out["w"][0, 0]) == pytest.approx(1.1)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_moving_average_invalid_decay(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        ServerMovingAverage(FedAvg(), decay=decay)


def test_moving_average_invalid_start_round():
    with pytest.raises(ValueError, match="first round must be >= 1"):
        ServerMovingAverage(FedAvg(), decay=0.5, start_round=0)


def test_strategy_broadcasts_the_moving_average():
    template = _float_template()
    strategy = _strategy(
        template,
        uplink_bits=32,
        downlink=FP32,
        moving_average=0.9,
    )
    history = []
    for server_round, value in [(1, 1.0), (2, 3.0)]:
        requests = _requests(strategy, server_round, template)
        state = {k: torch.full_like(v, value) for k, v in template.items()}
        replies = [_reply(r, _content(state, 10, bits=32)) for r in requests]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        history.append(arrays["fc.weight"].numpy())
    np.testing.assert_allclose(history[0], 1.0)
    np.testing.assert_allclose(history[1], 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------- inner strategies
#: Flower's strategy classes, by config name (imported here, not through strategies.factory).
PLAIN_STRATEGIES = {
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "fedprox": flwr_strategy.FedProx,
}
INNER_NODES = 5  # FedTrimmedAvg's beta=0.2 trims one update at each end of five


class RecordingGrid(InProcessGrid):
    """An ``InProcessGrid`` that keeps what a plain Flower strategy would get each train round.

    For every train round: the broadcast (float32 at a 32-bit downlink) and each reply as
    Flower's own strategies expect it: the decoded float32 update in an ArrayRecord and a
    MetricRecord with its num-examples. It is taken before the wrapper sees the replies.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[tuple[ArrayRecord, list[Message]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            sent = messages[0].content
            broadcast = decode_tensors(sent["arrays"], sent["arrays-format"], bits=32)
            requests = {m.metadata.message_id: m for m in messages}
            plain = []
            for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
                update = decode_tensors(reply.content["arrays"], reply.content["arrays-format"])
                content = RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in update.items()}),
                        "metrics": MetricRecord(
                            {"num-examples": reply.content["metrics"]["num-examples"]}
                        ),
                    }
                )
                plain.append(_reply(requests[reply.metadata.reply_to_message_id], content))
            record = ArrayRecord({k: Array(v.numpy()) for k, v in broadcast.items()})
            self.rounds.append((record, plain))
        return replies


def _unequal_weights(node_id: int, reply: Message) -> Message:
    """Give each node its own num-examples, so weighting differently from Flower shows."""
    if reply.metadata.message_type == MessageType.TRAIN:
        reply.content["metrics"]["num-examples"] = 8 * (node_id - 100)
    return reply


@pytest.mark.parametrize("name", list(PLAIN_STRATEGIES))
def test_inner_strategy_equals_plain_flower_on_the_decoded_updates(name):
    # Moving average off and a float32 downlink: the wrapper must then be exactly the plain
    # Flower strategy run on the dequantized updates (clipping off: it would edit them).
    run_config = {
        "overrides": f"dataset=synthetic model=small_cnn strategy={name} train.max_steps=2 "
        f"federation.num_clients={INNER_NODES} federation.fraction_train=1.0 "
        "server.moving_average=0 quantization.downlink_bits=32 server.update_clip_factor=0"
    }
    cfg = load_config(run_config)
    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    assert not strategy.moving_average.enabled and not strategy.messages.downlink.enabled
    grid = RecordingGrid(client_app, INNER_NODES, run_config, tamper=_unequal_weights)
    # The wrapper picks the order it hands updates to the inner strategy in (float32 sums
    # depend on it); note it, to give plain Flower the same order.
    orders: list[list[int]] = []
    inner_aggregate_train = strategy.inner.aggregate_train

    def noting_the_order(server_round, replies):
        replies = list(replies)
        orders.append([r.metadata.src_node_id for r in replies])
        return inner_aggregate_train(server_round, replies)

    strategy.inner.aggregate_train = noting_the_order

    result = strategy.start(
        grid=grid,
        initial_arrays=_initial(template),
        num_rounds=2,
        train_config=ConfigRecord({"lr": float(cfg.train.lr)}),
    )

    # The same Flower class with the same constructor arguments, fed what the clients sent.
    options = {k: v for k, v in OmegaConf.to_container(cfg.strategy).items() if k != "name"}
    fed = cfg.federation
    plain = PLAIN_STRATEGIES[name](
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_clients,
        min_evaluate_nodes=fed.min_evaluate_clients,
        min_available_nodes=fed.min_available_clients,
        **options,
    )
    assert type(strategy.inner) is type(plain)
    assert len(grid.rounds) == 2
    outputs = [broadcast for broadcast, _ in grid.rounds[1:]] + [result.arrays]
    for server_round, ((broadcast, replies), output, order) in enumerate(
        zip(grid.rounds, outputs, orders, strict=True), start=1
    ):
        assert strategy.traffic[server_round].rejected == []
        assert strategy.traffic[server_round].clipped == 0
        assert len(replies) == INNER_NODES
        by_node = {r.metadata.src_node_id: r for r in replies}
        assert sorted(order) == sorted(by_node)  # every update, each once
        replies = [by_node[node] for node in order]
        list(plain.configure_train(server_round, broadcast, ConfigRecord(), FakeGrid()))
        expected, _ = plain.aggregate_train(server_round, replies)
        assert list(output.keys()) == list(expected.keys()) == list(template)
        for key in template:
            got, want = output[key].numpy(), expected[key].numpy()
            assert got.dtype == np.float32, key
            if name == "fedadam":
                # FedAdam's bias-corrected step (a numpy float64 scalar) makes its aggregate
                # float64; the wrapper broadcasts the model's float32: compare after that cast.
                assert want.dtype == np.float64, key
                want = want.astype(np.float32)
            assert want.dtype == np.float32, key
            assert np.array_equal(got, want), (server_round, key)
    # Both rounds moved the model (a pass-through would equal nothing above but round 1's input).
    first, second = grid.rounds[0][0], grid.rounds[1][0]
    for a, b in ((first, second), (second, result.arrays)):
        assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in template)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert isinstance(strategy.messages.template["classifier.weight"], TensorSpec)


# ----------------------------------------------------------------------------- inner reference
def _received_and_replies(strategy, template):
    """The decoded broadcast of round 1 (what the clients train from) and their replies."""
    requests = _requests(strategy, 1, template)
    received = decode_tensors(requests[0].content["arrays"], requests[0].content["arrays-format"])
    initial = _initial(template)
    assert any(not np.array_equal(received[k].numpy(), initial[k].numpy()) for k in template)
    replies = [
        _reply(r, _content(_client_state(r.metadata.dst_node_id, template), seed=i))
        for i, r in enumerate(requests)
    ]
    return {k: v.numpy() for k, v in received.items()}, replies


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_strategies_step_from_the_model_the_clients_received(name):
    """The 4-bit broadcast Q(w) differs from the float32 w: FedOpt's reference must be Q(w)."""
    template = _float_template()
    cfg = load_config({"overrides": f"dataset=synthetic strategy={name}"})
    inner = build_strategy(cfg, specs_of(template), ()).inner
    strategy = _strategy(template, inner=inner, downlink=BlockFloat(4, layout="auto"))
    received, replies = _received_and_replies(strategy, template)
    assert all(np.array_equal(inner.current_arrays[k], received[k]) for k in template)
    # plain Flower given the same reference (as its initial model) and the decoded updates
    plain = type(inner)(**{k: getattr(inner, k) for k in ("eta", "eta_l", "tau")})
    plain.current_arrays = {k: v.copy() for k, v in received.items()}
    decoded = [
        _reply(
            r,
            RecordDict(
                {
                    "arrays": ArrayRecord(
                        {
                            k: Array(v.astype(np.float32))
                            for k, v in _decoded(r.content, template).items()
                        }
                    ),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
        )
        for r in sorted(replies, key=lambda r: content_digest(r.content))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected, _ = plain.aggregate_train(1, decoded)
    for k in template:
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k].numpy().astype(np.float32))


def test_fedavgm_steps_from_the_model_the_clients_received():
    from flwr.serverapp.strategy import FedAvgM

    template = _float_template()
    inner = FedAvgM(fraction_train=1.0, server_learning_rate=0.5, server_momentum=0.0)
    strategy = _strategy(template, inner=inner, downlink=BlockFloat(4, layout="auto"))
    received, replies = _received_and_replies(strategy, template)
    inner.current_arrays = _initial(template)  # FedAvgM's own reference: the float32 model
    decoded = [_decoded(r.content, template) for r in replies]
    average = _weighted_mean(decoded, [10] * len(decoded))
    arrays, _ = strategy.aggregate_train(1, replies)
    for k in template:  # w = ref - lr * (ref - avg), with ref = what the clients received
        want = received[k] - 0.5 * (received[k] - average[k])
        np.testing.assert_allclose(arrays[k].numpy(), want, rtol=1e-6, atol=1e-7)


def test_the_aggregate_is_bit_identical_whatever_the_arrival_order_and_timings():
    """Replies are summed in the order of what they contribute (arrays and weight), so the
    same updates give the same float32 model even when their timing metrics differ (they
    do between a run and its resumption) and they arrive in another order."""
    template = _float_template()
    models = [_client_state(node, template) for node in range(21, 26)]  # 5 replies: order matters

    def aggregate(order: list[int], seconds: float) -> dict[str, np.ndarray]:
        strategy = _strategy(template, uplink_bits=32, downlink=FP32)
        requests = _requests(strategy, template=template)
        replies = []
        for slot, i in enumerate(order):
            metrics = {"num-examples": 10 + i, "train-seconds": seconds * (slot + 1)}
            content = _content(models[i], bits=32, metrics=metrics)
            replies.append(_reply(requests[slot % len(requests)], content))
            replies[-1].metadata.__dict__["_src_node_id"] = 100 + slot  # distinct senders
        arrays, _ = strategy.aggregate_train(1, replies)
        return {k: arrays[k].numpy() for k in arrays}

    first = aggregate([0, 1, 2, 3, 4], seconds=1.0)
    for order, seconds in [([4, 3, 2, 1, 0], 2.5), ([2, 0, 4, 1, 3], 0.1)]:
        again = aggregate(order, seconds)
        assert all(np.array_equal(first[k], again[k]) for k in first)
