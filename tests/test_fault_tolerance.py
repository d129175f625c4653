"""Fault tolerance of the server side: malformed, crashed and missing client replies.

* A seeded fuzzer mutates real ClientApp replies (synthetic data, small CNN) in hundreds of
  ways and throws them at ``LowPrecisionStrategy.aggregate_train`` mixed with valid replies:
  every malformed reply must be rejected (and counted), nothing may raise, and the aggregate
  must be exactly the aggregate of the valid replies alone.
* A ClientApp that raises for one node, or a reply that never arrives (as after a timeout),
  must not stop ``strategy.start()``; a round in which every client fails keeps the previous
  model and the run still finishes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from safetensors.torch import load_file

from client_app.app import app as client_app
from lowprec_fl.task.config import load_config
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.wire import EXPONENT_SUFFIX, encode_tensors
from quantization import BlockFloat
from server_app.app import main as server_main
from strategies import LowPrecisionStrategy, is_traffic_metric
from tests.flower_harness import InProcessGrid
from tests.shared_helpers import configured_strategy, with_item

NUM_NODES = 3
BASE = (
    "dataset=synthetic model=small_cnn train.max_steps=2 federation.fraction_train=1.0 "
    f"federation.num_clients={NUM_NODES} federation.min_available_clients={NUM_NODES}"
)
#: Uplink settings the fuzzer runs against: 8-bit int8 codes, 4-bit packed codes, float32.
UPLINKS = {
    "bfp8": "",
    "bfp4-packed": "quantization=bfp4",
    "fp32": "quantization.uplink_bits=32",
}
MALFORMED_PER_UPLINK = 120  # 360 malformed replies in all


pytestmark = pytest.mark.usefixtures("flower_task")


def _run_config(extra: str = "", moving_average: bool = True) -> dict:
    overrides = f"{BASE} {extra}" + ("" if moving_average else " server.moving_average=0")
    return {"overrides": overrides.strip()}


def _setup(run_config: dict) -> tuple[LowPrecisionStrategy, dict[str, torch.Tensor], ArrayRecord]:
    return configured_strategy(run_config)


# ----------------------------------------------------------------------------- record editing
@dataclass
class Reply:
    """A ClientApp reply's content plus what the mutations need to know about it."""

    content: RecordDict
    bits: int  # the uplink bit width the server expects (32 = float32)

    @property
    def arrays(self) -> ArrayRecord:
        return self.content["arrays"]

    @property
    def formats(self) -> ConfigRecord:
        return self.content["arrays-format"]

    def names(self) -> list[str]:
        return list(self.formats.keys())

    def description(self, name: str) -> dict:
        return json.loads(self.formats[name])

    def quantized(self, name: str) -> bool:
        return "bits" in self.description(name)

    def set_arrays(self, **changes) -> RecordDict:
        arrays = self.arrays
        for key, value in changes.items():
            arrays = with_item(arrays, key, value)
        return with_item(self.content, "arrays", arrays)

    def set_array(self, key: str, value) -> RecordDict:
        return with_item(self.content, "arrays", with_item(self.arrays, key, value))

    def set_format(self, name: str, value) -> RecordDict:
        return with_item(self.content, "arrays-format", with_item(self.formats, name, value))

    def set_both(self, arrays: dict, formats: dict) -> RecordDict:
        content = self.content
        array_record, format_record = self.arrays, self.formats
        for key, value in arrays.items():
            array_record = with_item(array_record, key, value)
        for key, value in formats.items():
            format_record = with_item(format_record, key, value)
        content = with_item(content, "arrays", array_record)
        return with_item(content, "arrays-format", format_record)


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


# ----------------------------------------------------------------------------- mutations
# Each mutation returns (description, malformed content); every one must be rejected.
Mutation = Callable[[np.random.Generator, Reply], tuple[str, RecordDict]]


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _data_key(rng, reply: Reply) -> tuple[str, str]:
    """(tensor name, key of its main array: mantissas or raw values)."""
    name = _pick(rng, reply.names())
    return name, name


def _other_bits(rng, expected: int) -> int:
    return _pick(rng, [b for b in (*range(2, 17), 32) if b != expected])


def _wrong_shape(rng, shape: tuple[int, ...]) -> tuple[int, ...]:
    kind = int(rng.integers(4))
    if kind == 0:  # grow one dimension
        i = int(rng.integers(len(shape)))
        return tuple(d + int(rng.integers(1, 4)) if j == i else d for j, d in enumerate(shape))
    if kind == 1:  # extra unit dimension
        return (*shape, 1)
    if kind == 2 and len(shape) > 1:  # flattened
        return (int(np.prod(shape)),)
    return (*reversed(shape), 2)


def m_format_shape(rng, reply):
    name = _pick(rng, reply.names())
    d = reply.description(name)
    d["shape"] = list(_wrong_shape(rng, tuple(d["shape"])))
    return f"format shape of {name} -> {d['shape']}", reply.set_format(name, json.dumps(d))


def m_reencoded_wrong_shape(rng, reply):
    name = _pick(rng, reply.names())
    shape = _wrong_shape(rng, tuple(reply.description(name)["shape"]))
    fmt = BlockFloat(32) if reply.bits == 32 else BlockFloat(reply.bits, layout="block")
    arrays, formats = encode_tensors({name: torch.randn(shape)}, fmt)
    extra_exp = {name + EXPONENT_SUFFIX: None} if reply.quantized(name) else {}
    content = reply.set_both({**extra_exp, **dict(arrays.items())}, dict(formats.items()))
    return f"{name} re-encoded consistently with shape {shape}", content


def m_truncate(rng, reply):
    name, key = _data_key(rng, reply)
    if reply.quantized(name) and rng.random() < 0.4:
        key = name + EXPONENT_SUFFIX
    values = reply.arrays[key].numpy().reshape(-1)
    k = int(rng.integers(1, values.size + 1))
    return f"{key} truncated by {k}", reply.set_array(key, _array(values[: values.size - k]))


def m_pad(rng, reply):
    name, key = _data_key(rng, reply)
    if reply.quantized(name) and rng.random() < 0.4:
        key = name + EXPONENT_SUFFIX
    values = reply.arrays[key].numpy().reshape(-1)
    k = int(rng.integers(1, 64))
    padded = np.concatenate([values, values[:1].repeat(k)])
    return f"{key} padded by {k}", reply.set_array(key, _array(padded))


def m_npy_bytes(rng, reply):
    name, key = _data_key(rng, reply)
    if reply.quantized(name) and rng.random() < 0.3:
        key = name + EXPONENT_SUFFIX
    array = reply.arrays[key]
    data = array.data
    kind = int(rng.integers(4))
    if kind == 0:
        k = int(rng.integers(1, len(data)))
        bogus, what = data[: len(data) - k], f"truncated by {k} bytes"
    elif kind == 1:
        bogus, what = bytes(rng.integers(0, 256, len(data), dtype=np.uint8)), "random bytes"
    elif kind == 2:
        bogus, what = b"", "empty"
    else:
        bogus, what = data[:10] + b"\x00" * 50 + data[60:], "header zeroed"
    raw = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bogus)
    return f".npy data of {key} {what}", reply.set_array(key, raw)


def m_stype(rng, reply):
    _, key = _data_key(rng, reply)
    array = reply.arrays[key]
    stype = _pick(rng, ["torch.Tensor", "raw", "", "numpy.ndarray.pickle"])
    raw = Array(dtype=array.dtype, shape=array.shape, stype=stype, data=array.data)
    return f"{key} with stype {stype!r}", reply.set_array(key, raw)


def m_dtype(rng, reply):
    name, key = _data_key(rng, reply)
    if reply.quantized(name) and rng.random() < 0.4:
        key = name + EXPONENT_SUFFIX
    values = reply.arrays[key].numpy()
    choices = ["int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"]
    if not reply.quantized(name):  # a raw float32 tensor: also non-native byte order
        choices.append(">f4")
    dtype = np.dtype(_pick(rng, [c for c in choices if np.dtype(c) != values.dtype]))
    return f"{key} cast to {dtype.str}", reply.set_array(key, _array(values.astype(dtype)))


def m_out_of_range(rng, reply):
    quantized = [n for n in reply.names() if reply.quantized(n)]
    if not quantized:  # float32 uplink: values the float32 range cannot hold
        name = _pick(rng, reply.names())
        values = reply.arrays[name].numpy().astype(np.float64)
        values.reshape(-1)[int(rng.integers(values.size))] = 1e300
        return f"{name} as float64 beyond float32", reply.set_array(name, _array(values))
    name = _pick(rng, quantized)
    kind = int(rng.integers(3))
    if kind == 0:  # mantissa codes beyond the 8-bit / packed range
        values = reply.arrays[name].numpy().astype(np.int16)
        values[int(rng.integers(values.size))] = _pick(rng, [128, 300, -129, -1000, 32767])
        return f"{name} codes out of range (int16)", reply.set_array(name, _array(values))
    key = name + EXPONENT_SUFFIX
    if kind == 1:  # exponents beyond int8
        values = reply.arrays[key].numpy().astype(np.int16)
        values[int(rng.integers(values.size))] = _pick(rng, [128, 200, -129, -300])
        return f"{key} out of int8 range (int16)", reply.set_array(key, _array(values))
    # In range for int8 but overflowing float32: the largest-magnitude code at exponent 127.
    bits = reply.description(name)["bits"]
    size = reply.arrays[name].numpy().size
    code = -(1 << (bits - 1))
    mantissas = (
        np.full(size, code, np.int8)
        if bits == 8
        else np.full(size, (code & 0xF) * 0x11, np.uint8)  # 4-bit: two codes per byte
    )
    exps = np.full(reply.arrays[key].numpy().size, 127, np.int8)
    content = reply.set_arrays(**{name: _array(mantissas)})
    content = Reply(content, reply.bits).set_array(key, _array(exps))
    return f"{name} decodes to -inf (code {code}, exponent 127)", content


def m_non_finite(rng, reply):
    name = _pick(rng, reply.names())
    shape = tuple(reply.description(name)["shape"])
    values = (
        reply.arrays[name].numpy().copy()
        if not reply.quantized(name)
        else np.zeros(shape, np.float32)
    )
    flat = values.reshape(-1)
    for _ in range(int(rng.integers(1, 4))):
        flat[int(rng.integers(flat.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
    changes: dict = {name: _array(values)}
    if reply.quantized(name):
        changes[name + EXPONENT_SUFFIX] = None
    content = reply.set_both(changes, {name: json.dumps({"shape": list(shape)})})
    return f"{name} float32 with NaN/inf", content


def m_huge(rng, reply):
    kind = int(rng.integers(3))
    size = int(rng.integers(1, 5)) << 20  # 1-4 MiB, far above one update's size
    if kind == 0:
        name = _pick(rng, reply.names())
        huge = np.zeros(size, reply.arrays[name].numpy().dtype)
        return f"{name} replaced by {size} elements", reply.set_array(name, _array(huge))
    if kind == 1:
        extra = _array(np.zeros(size, np.uint8))
        content = reply.set_both({"huge": extra}, {"huge": json.dumps({"shape": [size]})})
        return f"extra tensor of {size} bytes", content
    name = _pick(rng, reply.names())
    d = reply.description(name)
    d["shape"] = [10**12, *d["shape"][1:]]
    return f"format shape of {name} -> {d['shape']}", reply.set_format(name, json.dumps(d))


def m_missing_key(rng, reply):
    name = _pick(rng, reply.names())
    kind = int(rng.integers(4))
    if kind == 0:
        return f"array {name} missing", reply.set_array(name, None)
    if kind == 1 and reply.quantized(name):
        key = name + EXPONENT_SUFFIX
        return f"array {key} missing", reply.set_array(key, None)
    if kind == 2:
        return f"format of {name} missing", reply.set_format(name, None)
    changes = {name: None, name + EXPONENT_SUFFIX: None}
    return f"tensor {name} missing entirely", reply.set_both(changes, {name: None})


def m_extra_key(rng, reply):
    name = _pick(rng, reply.names())
    kind = int(rng.integers(4))
    if kind == 0:
        return "extra array key", reply.set_array("extra", _array(np.zeros(3, np.int8)))
    if kind == 1:
        content = reply.set_both(
            {"extra": _array(np.zeros(3, np.float32))}, {"extra": json.dumps({"shape": [3]})}
        )
        return "extra tensor with format", content
    if kind == 2 and not reply.quantized(name):
        key = name + EXPONENT_SUFFIX
        return f"stray {key}", reply.set_array(key, _array(np.zeros(1, np.int8)))
    new = name + ".renamed"
    arrays = {name: None, new: reply.arrays[name]}
    if reply.quantized(name):
        arrays[name + EXPONENT_SUFFIX] = None
        arrays[new + EXPONENT_SUFFIX] = reply.arrays[name + EXPONENT_SUFFIX]
    content = reply.set_both(arrays, {name: None, new: reply.formats[name]})
    return f"{name} renamed to {new}", content


def m_metrics(rng, reply):
    metrics = dict(reply.content["metrics"].items())
    kind = int(rng.integers(9))
    if kind == 0:
        return "no MetricRecord", with_item(reply.content, "metrics", None)
    if kind == 1:
        del metrics["num-examples"]
        what = "num-examples missing"
    elif kind == 2:
        metrics["num-examples"] = _pick(rng, [0, -1, -64, 0.0, -0.5])
        what = f"num-examples {metrics['num-examples']}"
    elif kind == 3:
        metrics["num-examples"] = _pick(rng, [float("nan"), float("inf"), -float("inf"), 1e13])
        what = f"num-examples {metrics['num-examples']}"
    elif kind == 4:
        metrics["num-examples"] = [64, 64]
        what = "num-examples a list"
    elif kind == 5:
        metrics["train-loss"] = _pick(rng, [float("nan"), float("inf"), [1.0, float("nan")]])
        what = f"train-loss {metrics['train-loss']}"
    elif kind == 6:
        extra = MetricRecord({"num-examples": 5})
        return "two MetricRecords", with_item(reply.content, "more-metrics", extra)
    elif kind == 7:
        metrics = {"num-example": metrics["num-examples"]}
        what = "weight key misspelt"
    else:
        content = with_item(reply.content, "metrics", None)
        return "metrics sent as a ConfigRecord", with_item(content, "cfg", ConfigRecord(metrics))
    return what, with_item(reply.content, "metrics", MetricRecord(metrics))


BOGUS_FORMATS: list[Callable[[dict], object]] = [
    lambda d: "{not json",
    lambda d: "",
    lambda d: "null",
    lambda d: json.dumps([d["shape"]]),
    lambda d: json.dumps(7),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "shape"}),
    lambda d: json.dumps({**d, "shape": "10"}),
    lambda d: json.dumps({**d, "shape": {"0": 10}}),
    lambda d: json.dumps({**d, "shape": [float(x) for x in d["shape"]]}),
    lambda d: json.dumps({**d, "shape": [True] * len(d["shape"])}),
    lambda d: json.dumps({**d, "shape": [-x for x in d["shape"]]}),
    lambda d: json.dumps({**d, "shape": [str(x) for x in d["shape"]]}),
    lambda d: json.dumps({**d, "shape": [1] * 9 + list(d["shape"])}),
    lambda d: json.dumps({**d, "shape": [float("nan")]}),  # NaN is not JSON
    lambda d: json.dumps({**d, "shape": [float("inf")]}),
    lambda d: 12345,  # not a string at all
    lambda d: ["a", "b"],
    lambda d: json.dumps(d).encode(),
]
BOGUS_QUANTIZED_FORMATS: list[Callable[[dict], object]] = [
    lambda d: json.dumps({**d, "bits": str(d["bits"])}),
    lambda d: json.dumps({**d, "bits": float(d["bits"])}),
    lambda d: json.dumps({**d, "bits": True}),
    lambda d: json.dumps({**d, "bits": None}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "layout"}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "block_size"}),
    lambda d: json.dumps({**d, "layout": "diagonal"}),
    lambda d: json.dumps({**d, "layout": ["block"]}),
    lambda d: json.dumps({**d, "block_size": 0}),
    lambda d: json.dumps({**d, "block_size": -32}),
    lambda d: json.dumps({**d, "block_size": "32"}),
    lambda d: json.dumps({**d, "block_size": 32.5}),
    lambda d: json.dumps({**d, "bits": 1}),
    lambda d: json.dumps({**d, "bits": 17}),
    lambda d: json.dumps({**d, "bits": 0}),
    lambda d: json.dumps({**d, "bits": -8}),
]


def m_bogus_format(rng, reply):
    name = _pick(rng, reply.names())
    d = reply.description(name)
    choices = BOGUS_FORMATS + (BOGUS_QUANTIZED_FORMATS if reply.quantized(name) else [])
    i = int(rng.integers(len(choices)))
    value = choices[i](d)
    return f"format of {name} -> {value!r:.60}", reply.set_format(name, value)


def m_bit_width(rng, reply):
    name = _pick(rng, reply.names())
    kind = int(rng.integers(3))
    bits = _other_bits(rng, reply.bits)
    if kind == 0 and reply.quantized(name):  # only the description lies
        d = reply.description(name)
        d["bits"] = bits
        return f"format of {name} claims {bits} bits", reply.set_format(name, json.dumps(d))
    if kind == 1:  # one tensor consistently at another width
        shape = tuple(reply.description(name)["shape"])
        fmt = BlockFloat(bits, layout="block")
        arrays, formats = encode_tensors({name: torch.randn(shape)}, fmt)
        changes = {name + EXPONENT_SUFFIX: None, **dict(arrays.items())}
        return f"{name} encoded at {bits} bits", reply.set_both(changes, dict(formats.items()))
    # the whole model at another width
    tensors = {}
    for n in reply.names():
        tensors[n] = torch.randn(tuple(reply.description(n)["shape"]))
    arrays, formats = encode_tensors(tensors, BlockFloat(bits, layout="block"))
    content = with_item(reply.content, "arrays", arrays)
    return f"whole model at {bits} bits", with_item(content, "arrays-format", formats)


def m_records(rng, reply):
    kind = int(rng.integers(6))
    c = reply.content
    if kind == 0:
        return "no ArrayRecord", with_item(c, "arrays", None)
    if kind == 1:
        extra = ArrayRecord({"x": _array(np.zeros(1, np.float32))})
        return "two ArrayRecords", with_item(c, "other-arrays", extra)
    if kind == 2:
        return "ArrayRecord renamed", with_item(
            with_item(c, "weights", c["arrays"]), "arrays", None
        )
    if kind == 3:
        return "no format record", with_item(c, "arrays-format", None)
    if kind == 4:
        renamed = with_item(c, "weights-format", c["arrays-format"])
        return "format record renamed", with_item(renamed, "arrays-format", None)
    empty = with_item(c, "arrays", ArrayRecord())
    return "empty ArrayRecord", empty


MUTATIONS: dict[str, Mutation] = {
    "format-shape": m_format_shape,
    "reencoded-wrong-shape": m_reencoded_wrong_shape,
    "truncate": m_truncate,
    "pad": m_pad,
    "npy-bytes": m_npy_bytes,
    "stype": m_stype,
    "dtype": m_dtype,
    "out-of-range": m_out_of_range,
    "non-finite": m_non_finite,
    "huge": m_huge,
    "missing-key": m_missing_key,
    "extra-key": m_extra_key,
    "metrics": m_metrics,
    "bogus-format": m_bogus_format,
    "bit-width": m_bit_width,
    "records": m_records,
}


# ----------------------------------------------------------------------------- fuzz test
def _reply_message(request: Message, content: RecordDict, node_id: int) -> Message:
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def _assert_same_aggregate(got, expected, context: str) -> None:
    arrays, metrics = got
    ref_arrays, ref_metrics = expected
    assert arrays is not None, context
    assert set(arrays.keys()) == set(ref_arrays.keys()), context
    for name in ref_arrays:
        assert np.array_equal(arrays[name].numpy(), ref_arrays[name].numpy()), (name, context)
    # the clients' aggregated metrics; the traffic counts differ with the rejected replies
    clients = {k: v for k, v in metrics.items() if not is_traffic_metric(k)}
    assert clients == {k: v for k, v in ref_metrics.items() if not is_traffic_metric(k)}, context


@pytest.mark.parametrize("uplink", list(UPLINKS))
def test_fuzzed_replies_are_all_rejected_and_never_change_the_aggregate(uplink):
    strategy, _, initial = _setup(_run_config(UPLINKS[uplink], moving_average=False))
    grid = InProcessGrid(client_app, NUM_NODES, _run_config(UPLINKS[uplink]))
    requests = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    originals = list(grid.send_and_receive(requests))
    assert len(originals) == NUM_NODES
    by_node = {r.metadata.dst_node_id: r for r in requests}
    valid = [(r.metadata.src_node_id, r.content) for r in originals]
    bits = strategy.messages.uplink.bits

    def valid_replies() -> list[Message]:
        return [_reply_message(by_node[n], c, n) for n, c in valid]

    expected = strategy.aggregate_train(1, valid_replies())
    assert strategy.traffic[1].rejected == []
    assert expected[0] is not None

    rng = np.random.default_rng(sum(map(ord, uplink)))
    families = list(MUTATIONS)
    cases = []  # (node id, family, description, content)
    for i in range(MALFORMED_PER_UPLINK):
        family = families[i % len(families)]
        node, content = valid[int(rng.integers(len(valid)))]
        what, bad = MUTATIONS[family](rng, Reply(content, bits))
        cases.append((10_000 + i, family, what, bad))

    server_round, position = 2, 0
    while position < len(cases):
        batch = cases[position : position + int(rng.integers(1, 5))]
        position += len(batch)
        replies = valid_replies()
        for node, _, _, content in batch:
            at = int(rng.integers(len(replies) + 1))
            replies.insert(at, _reply_message(requests[0], content, node))
        context = [f"{family}: {what}" for _, family, what, _ in batch]
        try:
            got = strategy.aggregate_train(server_round, replies)
        except Exception as err:  # pragma: no cover - that is the failure we look for
            pytest.fail(f"aggregate_train raised {err!r} on {context}")
        rejected = strategy.traffic[server_round].rejected
        rejected_nodes = sorted(int(reason.split(":")[0].split()[1]) for reason in rejected)
        assert rejected_nodes == sorted(n for n, *_ in batch), (context, rejected)
        _assert_same_aggregate(got, expected, str(context))
        server_round += 1

    total = sum(len(strategy.traffic[r].rejected) for r in strategy.traffic)
    assert total == MALFORMED_PER_UPLINK
    assert {family for _, family, _, _ in cases} == set(MUTATIONS)


# ----------------------------------------------------------------------------- crashes, timeouts
class Recorder:
    """``evaluate_fn`` that keeps a copy of the model ``strategy.start()`` evaluates each round."""

    def __init__(self) -> None:
        self.models: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.models[server_round] = {k: arrays[k].numpy().copy() for k in arrays}
        return MetricRecord({"evaluated": 1})


def _spy_on_inner(strategy: LowPrecisionStrategy) -> dict[int, list[int]]:
    """Record, per round, which nodes' valid updates reached the inner strategy."""
    seen: dict[int, list[int]] = {}
    inner_aggregate = strategy.inner.aggregate_train

    def aggregate_train(server_round, replies):
        replies = list(replies)
        seen[server_round] = sorted(r.metadata.src_node_id for r in replies if not r.has_error())
        return inner_aggregate(server_round, replies)

    strategy.inner.aggregate_train = aggregate_train
    return seen


def _same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _start(strategy, grid, initial, num_rounds: int, recorder: Recorder):
    return strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=5.0,
        train_config=ConfigRecord({"lr": 1e-3}),
        evaluate_fn=recorder,
    )


def test_a_crashing_client_and_a_missing_reply_do_not_stop_the_run():
    run_config = _run_config()
    strategy, _, initial = _setup(run_config)
    crashing, silent = 101, 103

    def flaky_client_app(msg: Message, context: Context) -> Message:
        if context.node_id == crashing:
            raise RuntimeError("simulated ClientApp crash")
        return client_app(msg, context)

    dropped: list[int] = []

    def drop_silent(node_id: int, reply: Message) -> Message | None:
        if node_id == silent:
            if reply.metadata.message_type == "train":
                dropped.append(node_id)
            return None  # as if the reply never arrived before the round timeout
        return reply

    grid = InProcessGrid(
        flaky_client_app, NUM_NODES, run_config, tamper=drop_silent, client_errors=True
    )
    seen = _spy_on_inner(strategy)
    recorder = Recorder()

    result = _start(strategy, grid, initial, 2, recorder)

    assert dropped == [silent, silent]
    assert seen == {1: [102], 2: [102]}  # only the healthy node's update was aggregated
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert sorted(recorder.models) == [0, 1, 2]
    assert not _same_model(recorder.models[1], recorder.models[0])  # round 1 trained
    for server_round in (1, 2):
        traffic = strategy.traffic[server_round]
        assert traffic.rejected == []  # errors and missing replies are not "malformed"
        assert traffic.uplink_bytes > 0
    assert set(result.arrays.keys()) == set(recorder.models[0])


def test_error_replies_carry_flowers_error_code():
    run_config = _run_config()
    strategy, _, initial = _setup(run_config)

    def broken(msg: Message, context: Context) -> Message:
        raise ValueError("boom")

    grid = InProcessGrid(broken, NUM_NODES, run_config, client_errors=True)
    replies = list(
        grid.send_and_receive(strategy.configure_train(1, initial, ConfigRecord(), grid))
    )
    assert len(replies) == NUM_NODES
    for reply in replies:
        assert reply.has_error()
        assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "boom" in reply.error.reason


@pytest.mark.parametrize("failure", ["crash", "timeout"])
def test_a_round_where_every_client_fails_keeps_the_previous_model(failure):
    run_config = _run_config()
    strategy, _, initial = _setup(run_config)
    failing_round = 2
    calls: dict[int, int] = {}  # node -> train messages received so far (= its current round)

    def client(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type != "train":  # the strategy's partition-id query
            return client_app(msg, context)
        calls[context.node_id] = calls.get(context.node_id, 0) + 1
        if failure == "crash" and calls[context.node_id] == failing_round:
            raise RuntimeError("every ClientApp crashes in round 2")
        return client_app(msg, context)

    def tamper(node_id: int, reply: Message) -> Message | None:
        is_train = reply.metadata.message_type == "train"
        if failure == "timeout" and is_train and calls[node_id] == failing_round:
            return None
        return reply

    grid = InProcessGrid(client, NUM_NODES, run_config, tamper=tamper, client_errors=True)
    seen = _spy_on_inner(strategy)
    recorder = Recorder()

    result = _start(strategy, grid, initial, 3, recorder)

    assert sorted(recorder.models) == [0, 1, 2, 3]  # the run finished all rounds
    assert failing_round not in seen  # nothing to aggregate: the inner strategy was skipped
    assert sorted(seen) == [1, 3]
    assert _same_model(recorder.models[2], recorder.models[1])  # round 2 kept round 1's model
    assert not _same_model(recorder.models[3], recorder.models[2])  # round 3 trained again
    # every round reports its traffic; the failed one has no client metrics to report
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert all(is_traffic_metric(k) for k in result.train_metrics_clientapp[failing_round])
    assert _same_model({k: result.arrays[k].numpy() for k in result.arrays}, recorder.models[3])
    assert strategy.traffic[failing_round].uplink_bytes == 0


def test_a_run_where_every_round_fails_still_finishes():
    run_config = _run_config()
    strategy, _, initial = _setup(run_config)
    grid = InProcessGrid(client_app, NUM_NODES, run_config, tamper=lambda node, reply: None)
    recorder = Recorder()

    result = _start(strategy, grid, initial, 2, recorder)

    assert sorted(recorder.models) == [0, 1, 2]
    assert _same_model(recorder.models[1], recorder.models[0])
    assert _same_model(recorder.models[2], recorder.models[0])
    # Flower's Result keeps an empty ArrayRecord when no round produced a model.
    assert len(result.arrays) == 0


def test_server_app_saves_the_model_even_when_every_round_fails(tmp_path):
    run_config = _run_config(f"federation.num_rounds=1 output_dir={tmp_path}")
    grid = InProcessGrid(client_app, NUM_NODES, run_config, tamper=lambda node, reply: None)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )

    server_main(grid, context)

    saved = load_file(str(tmp_path / "model.safetensors"))
    model = build_configured_model(load_config(run_config))
    assert set(saved) == set(model.state_dict())
