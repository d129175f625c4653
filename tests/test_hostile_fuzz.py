"""Property-based fuzzing (Hypothesis) of every trust boundary: what no bad input may break.

Each test throws generated hostile input at one boundary and checks a property that must hold
for *every* input, not just the ones somebody thought of:

1. the wire decoder returns tensors that match the expected specs, or raises
   ``WireFormatError`` - nothing else - and its memory stays bounded by the message's size;
2. the strategy rejects (and records) every bad reply, never raises, and aggregates exactly
   what it would have aggregated from the valid replies alone (train and evaluate);
3. the ClientApp answers a fuzzed broadcast normally or raises a ``ValueError`` with a
   message (Flower turns it into an error reply), with bounded memory while decoding;
4. a client's state directory stays inside its state root whatever lineage the server sends;
5. a damaged or rewritten checkpoint loads as the original or raises ``CheckpointError``
   naming the file;
6. a damaged or rewritten client state file reads as the original state or as None.

The default Hypothesis profile (tests/conftest.py) is fast and deterministic; run the long
search with ``HYPOTHESIS_PROFILE=fuzz pytest -m fuzz tests/test_hostile_fuzz.py``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import random
import shutil
import struct
import tempfile
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from hypothesis import event, given, note, target
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client_app.app import app as client_app
from client_app.mod import LowPrecisionMod
from client_app.state import (
    STATE_KEY,
    StateDirectoryError,
    read_round_state,
    state_directory,
    write_round_state,
)
from lowprec_fl.task.config import load_config
from lowprec_fl.task.formats import downlink_format
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.task.verified_file import load_verified, save_verified
from lowprec_fl.wire import (
    EXPONENT_SUFFIX,
    FORMAT_SUFFIX,
    TensorSpec,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    payload_limit,
    specs_of,
)
from quantization import FP32, BlockFloat
from quantization.codec import encode
from quantization.format import LAYOUTS
from scripts.task_identity import task_identity
from server_app.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    check_fits,
    load_checkpoint,
    save_checkpoint,
)
from strategies import LowPrecisionStrategy, is_traffic_metric
from strategies.update_guard import UpdateGuard
from tests.shared_helpers import with_item
from tests.test_checkpoint_resume import MODEL
from tests.test_checkpoint_resume import _strategy as _checkpoint_strategy
from tests.test_client_app import NODE_ID, _context
from tests.test_client_app import _run_config as _client_run_config
from tests.test_fault_tolerance import BOGUS_FORMATS, BOGUS_QUANTIZED_FORMATS
from tests.test_strategy import (
    BAD_REPLIES,
    FLOAT_BUFFERS,
    NODES,
    _client_state,
    _content,
    _requests,
    _template,
)
from tests.test_strategy import _strategy as _wire_strategy

pytestmark = pytest.mark.fuzz

MB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _flower_identity() -> Iterator[None]:
    """Messages outside a Flower runtime; the ClientApp's torch.set_num_threads undone."""
    threads = torch.get_num_threads()
    with task_identity():
        yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- memory
@contextmanager
def traced_peak() -> Iterator[dict[str, int]]:
    """Peak bytes Python (and numpy) allocated inside the block; torch is not traced."""
    box: dict[str, int] = {}
    tracemalloc.start()
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _message_bytes(records: Mapping[str, object]) -> int:
    """What a message carries: array bytes, config strings (8 bytes a scalar), and key names."""
    total = 0
    for key, record in records.items():
        total += len(key)
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        elif isinstance(record, ConfigRecord | MetricRecord):
            for name, value in record.items():
                values = value if isinstance(value, list) else [value]
                total += len(name) + sum(
                    len(v) if isinstance(v, str | bytes) else 8 for v in values
                )
    return total


def _float32_bytes(specs: Mapping[str, TensorSpec]) -> int:
    return sum(4 * math.prod(spec.shape) for spec in specs.values())


def _memory_bound(message_bytes: int, specs: Mapping[str, TensorSpec]) -> int:
    """The most a decoder may allocate: a small multiple of what it was sent and must build."""
    return 4 * (message_bytes + _float32_bytes(specs)) + MB


def _assert_matches_specs(tensors: Mapping[str, torch.Tensor], specs) -> None:
    assert set(tensors) == set(specs)
    for name, spec in specs.items():
        t = tensors[name]
        assert tuple(t.shape) == spec.shape, name
        assert t.dtype == spec.dtype, name
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), name
    # torch's allocations escape tracemalloc: the decoded tensors are what is bounded instead
    decoded = sum(t.numel() * t.element_size() for t in tensors.values())
    assert decoded <= sum(
        max(4, spec.dtype.itemsize) * math.prod(spec.shape) for spec in specs.values()
    )


# ----------------------------------------------------------------------------- hostile values
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
HUGE_INTS = st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 + 3])
DIMS = st.integers(-3, 12) | HUGE_INTS | HUGE_INTS.map(lambda n: -n)
#: Values a ConfigRecord can carry (what the wire can bring), of every type.
CONFIG_NON_STRINGS = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.binary(max_size=16)
    | st.lists(st.integers(-5, 5), min_size=1, max_size=3)
    | st.lists(st.floats(), min_size=1, max_size=3)
    | st.lists(st.text(max_size=3), min_size=1, max_size=3)
)
CONFIG_VALUES = CONFIG_NON_STRINGS | st.text(max_size=12)
RAW_FORMATS = st.sampled_from(
    [
        '{"shape": [NaN]}',
        '{"shape": [Infinity]}',
        '{"shape": [-Infinity], "bits": 4}',
        '{"shape": [3], "bits": 4, "layout": "block", "block_size": 1e400}',
        '{"shape": [3], "shape": [4]}',
        '{"shape": [1e2]}',
        json.dumps({"shape": [1] * 300}),  # longer than MAX_FORMAT_CHARS
        "[" * 300 + "]" * 300,
        "\x00",
        "{}",
    ]
)


@st.composite
def descriptions(draw, real: object):
    """A format description near the honest one ``real`` (a JSON string, if any)."""
    try:
        honest = json.loads(real) if isinstance(real, str) else {}
        honest = honest if isinstance(honest, dict) else {}
    except ValueError:
        honest = {}
    choice = draw(st.sampled_from(["edit", "bogus", "raw", "json", "text", "non-string"]))
    if choice == "bogus" and "shape" in honest:
        quantized = "bits" in honest
        bogus = BOGUS_FORMATS + (BOGUS_QUANTIZED_FORMATS if quantized else [])
        return draw(st.sampled_from(bogus))(dict(honest))
    if choice == "raw":
        return draw(RAW_FORMATS)
    if choice == "json":
        return json.dumps(draw(JSON_VALUES))
    if choice == "text":
        return draw(st.text(max_size=40))
    if choice == "non-string":
        return draw(CONFIG_NON_STRINGS)
    fields = {
        "shape": st.lists(DIMS, max_size=10) | JSON_VALUES,
        "bits": st.integers(-2, 40) | st.sampled_from([64, 2**40]) | JSON_VALUES,
        "layout": st.sampled_from(LAYOUTS) | st.text(max_size=8) | JSON_VALUES,
        "block_size": st.integers(-3, 70) | HUGE_INTS | JSON_VALUES,
    }
    description = dict(honest)
    for key, values in fields.items():
        action = draw(st.sampled_from(["keep", "set", "drop"]), label=f"{key} action")
        if action == "set":
            description[key] = draw(values, label=key)
        elif action == "drop":
            description.pop(key, None)
    if draw(st.booleans()):
        description[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return json.dumps(description)


NPY_DESCRS = (
    st.sampled_from(["<f4", "|i1", "|u1", "<i2", "<i8", "<f8", "<f2", "|b1", "<c8", ">f4", ">i8"])
    | st.sampled_from(["|V16", "|V100000", "<U1000", "|S7", "<M8[s]", "garbage", "|O"])
    | st.just([("a", "<f4"), ("b", "|i1")])
)
NPY_DTYPES = st.sampled_from(
    ["int8", "uint8", "int16", "uint16", "int32", "int64", "uint64", "float16", "float32"]
) | st.sampled_from(["float64", "bool", "complex64", ">f4", ">i8", ">i2", "<U3", "S2"])
STYPES = st.sampled_from(["numpy.ndarray", "torch.Tensor", "", "numpy.ndarray.pickle"]) | st.text(
    max_size=12
)


def _npy_parts(data: bytes) -> tuple[bytes, bytes]:
    """(header, body) of a .npy payload; the whole of it as body if it has no valid header."""
    stream = io.BytesIO(data)
    try:
        _read_npy_header(stream)
    except Exception:
        return b"", data
    return data[: stream.tell()], data[stream.tell() :]


def _read_npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _npy_header(descr, shape: tuple[int, ...], fortran: bool) -> bytes:
    """A .npy (v1.0) header as numpy writes it, claiming any descr and shape."""
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


def _numpy_or_none(array: Array | None) -> np.ndarray | None:
    try:
        return None if array is None else array.numpy()
    except Exception:
        return None


@st.composite
def edited_bytes(draw, data: bytes) -> bytes:
    """``data`` truncated, extended, with bytes replaced, or replaced wholly."""
    kind = draw(st.sampled_from(["truncate", "extend", "replace", "random"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1), label="keep bytes")]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=64), label="appended")
    if kind == "replace" and data:
        edited = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            edited[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(edited)
    return draw(st.binary(max_size=300), label="random bytes")


@st.composite
def replacement_arrays(draw, old: np.ndarray | None) -> np.ndarray:
    """A numpy array to put where ``old`` was: cast, reshaped, extreme, or unrelated."""
    kinds = ["random"] + (["cast", "reshape", "extreme", "resize"] if old is not None else [])
    kind = draw(st.sampled_from(kinds), label="array edit")
    if kind == "cast":
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return old.astype(np.dtype(draw(NPY_DTYPES, label="dtype")))
    if kind == "reshape":
        flat = old.reshape(-1)
        return draw(st.sampled_from([flat, flat[None], flat.reshape(-1, 1), flat[:0]]))
    if kind == "resize":
        flat = old.reshape(-1)
        k = draw(st.integers(-flat.size, 64), label="elements added")
        return flat[: flat.size + k] if k < 0 else np.concatenate([flat, flat[:1].repeat(k)])
    if kind == "extreme":
        edited = old.copy()
        flat = edited.reshape(-1)
        if flat.size:
            i = draw(st.integers(0, flat.size - 1))
            if flat.dtype.kind == "f":
                flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45]))
            elif flat.dtype.kind in "iu":
                info = np.iinfo(flat.dtype)
                flat[i] = draw(st.sampled_from([info.min, info.max, 0, -1 if info.min else 1]))
            elif flat.dtype.kind == "b":
                flat[i] = not flat[i]
        return edited
    return draw(
        hnp.arrays(
            dtype=NPY_DTYPES.map(np.dtype),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        ),
        label="random array",
    )


@dataclass(frozen=True)
class Boundary:
    """What a wire mutation may know: the tensors expected there and the payload limit."""

    specs: Mapping[str, TensorSpec]
    limit: int


def _key(draw, mapping: Mapping[str, object], label: str) -> str:
    """An existing key of ``mapping`` (mostly) or a fresh, maybe confusing, name."""
    existing = sorted(mapping)
    choices = st.sampled_from(["extra", "", EXPONENT_SUFFIX, "x" + EXPONENT_SUFFIX]) | st.text(
        max_size=10
    )
    related = [name + EXPONENT_SUFFIX for name in existing if EXPONENT_SUFFIX not in name]
    if related:
        choices = st.sampled_from(related) | choices
    if existing:
        choices = st.sampled_from(existing) | choices
    return draw(choices, label=label)


# A wire mutation edits (arrays, formats) in place: dict[str, Array], dict[str, config value].
WireMutation = Callable[[Callable, Boundary, dict, dict], None]


def m_format(draw, boundary, arrays, formats):
    name = _key(draw, formats, "format of")
    formats[name] = draw(descriptions(formats.get(name)), label="format value")


def m_drop(draw, boundary, arrays, formats):
    which = draw(st.sampled_from(["array", "format", "both"]), label="drop")
    if which in ("array", "both") and arrays:
        arrays.pop(draw(st.sampled_from(sorted(arrays)), label="dropped array"))
    if which in ("format", "both") and formats:
        formats.pop(draw(st.sampled_from(sorted(formats)), label="dropped format"))


def m_rename(draw, boundary, arrays, formats):
    table = draw(st.sampled_from(["array", "format"]), label="rename in")
    mapping = arrays if table == "array" else formats
    if mapping:
        old = draw(st.sampled_from(sorted(mapping)), label="renamed")
        mapping[_key(draw, mapping, "new name")] = mapping.pop(old)


def m_copy(draw, boundary, arrays, formats):
    if arrays:
        source = draw(st.sampled_from(sorted(arrays)), label="copied")
        arrays[_key(draw, arrays, "copied to")] = arrays[source]


def p_array(draw, old: Array | None) -> Array:
    """A numpy array where ``old`` was: cast, reshaped, resized, extreme, or unrelated."""
    return Array(np.array(draw(replacement_arrays(_numpy_or_none(old))), order="C"))


def p_bytes(draw, old: Array | None) -> Array:
    """``old``'s serialized bytes truncated, extended or edited (its metadata kept)."""
    old = old or Array(np.zeros(3, np.float32))
    data = draw(edited_bytes(old.data))
    return Array(dtype=old.dtype, shape=old.shape, stype=old.stype, data=data)


def p_raw(draw, old: Array | None) -> Array:
    """Any ``Array(dtype=..., shape=..., stype=..., data=...)`` at all."""
    return Array(
        dtype=draw(st.sampled_from(["float32", "int8", "uint8"]) | st.text(max_size=8)),
        shape=tuple(draw(st.lists(DIMS, max_size=4))),
        stype=draw(STYPES, label="stype"),
        data=draw(st.binary(max_size=300), label="data"),
    )


def p_npy_header(draw, old: Array | None) -> Array:
    """A .npy header that claims another dtype or shape than its body holds."""
    _, body = _npy_parts(old.data) if old is not None else (b"", b"")
    claims = st.sampled_from([10**6, 10**7, 10**8]) | st.integers(0, 2**40) | DIMS
    shape = tuple(draw(st.lists(claims, max_size=3), label="claimed shape"))
    descr = draw(NPY_DESCRS, label="claimed descr")
    header = _npy_header(descr, shape, draw(st.booleans(), label="fortran"))
    if draw(st.booleans(), label="body edited"):
        body = draw(edited_bytes(body))
    return Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=header + body)


PAYLOADS = [p_npy_header, p_bytes, p_raw, p_array]


def m_payload(draw, boundary, arrays, formats):
    key = _key(draw, arrays, "payload of")
    payload = draw(st.sampled_from(PAYLOADS), label="payload")
    arrays[key] = payload(draw, arrays.get(key))


def m_reencode(draw, boundary, arrays, formats):
    """One tensor re-encoded consistently, in any format, any shape."""
    name = _key(draw, formats, "re-encoded")
    if EXPONENT_SUFFIX in name:  # not a tensor name encode_tensors accepts
        return
    spec = boundary.specs.get(name)
    shape = draw(
        st.just(spec.shape) | hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
        if spec is not None
        else hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        label="shape",
    )
    fmt = draw(
        st.just(FP32)
        | st.builds(
            BlockFloat,
            bits=st.integers(2, 16),
            layout=st.sampled_from(LAYOUTS),
            block_size=st.integers(1, 64) | st.sampled_from([2**12, 2**16]),
        ),
        label="format",
    )
    scale = draw(st.sampled_from([1.0, 0.0, 1e-30, 1e30]), label="scale")
    value = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * scale
    if draw(st.booleans(), label="integer tensor"):
        value = value.to(torch.int64)
    encoded, described = encode_tensors({name: value}, fmt)
    arrays.pop(name, None)
    arrays.pop(name + EXPONENT_SUFFIX, None)
    arrays.update(encoded.items())
    formats.update(described.items())


def m_oversize(draw, boundary, arrays, formats):
    key = _key(draw, arrays, "oversized")
    size = draw(st.integers(boundary.limit // 2, 3 * boundary.limit), label="bytes")
    arrays[key] = Array(np.zeros(size, np.uint8))


WIRE_MUTATIONS: list[WireMutation] = [
    m_format,
    m_payload,
    m_drop,
    m_rename,
    m_copy,
    m_reencode,
    m_oversize,
]


def _mutate_wire(data, boundary: Boundary, arrays: dict, formats: dict, max_mutations=4) -> int:
    """Apply 0..``max_mutations`` random wire mutations in place; returns how many."""
    # Mostly one: a single flaw reaches the decoder's deepest checks; stacked ones fail early.
    counts = [1, 1, 1, 1, 0, 2, 2, *range(3, max_mutations + 1)]
    count = data.draw(st.sampled_from(counts), label="mutations")
    for _ in range(count):
        mutation = data.draw(st.sampled_from(WIRE_MUTATIONS), label="mutation")
        mutation(data.draw, boundary, arrays, formats)
    return count


# ----------------------------------------------------------------------------- 1. wire decoder
TEMPLATE = _template()
SPECS = specs_of(TEMPLATE)
WIRE_BOUNDARY = Boundary(SPECS, payload_limit(SPECS))
WIRE_FORMATS = [
    BlockFloat(4, layout="auto"),
    BlockFloat(8, layout="block", block_size=32),
    BlockFloat(2),
    BlockFloat(6, layout="channel"),
    BlockFloat(12, layout="kernel"),
    BlockFloat(16, layout="block", block_size=5),
    FP32,
]


def _honest_wire(fmt: BlockFloat, allow_float, seed: int) -> tuple[dict, dict]:
    encoded, described = encode_tensors(
        _client_state(seed), fmt, torch.Generator().manual_seed(seed), keep_float=allow_float
    )
    return dict(encoded.items()), dict(described.items())


def _assert_decodes_to_specs_or_refuses(arrays: dict, formats: dict, fmt, allow_float) -> bool:
    """The decoder's property on one message; returns whether it was refused."""
    arrays_record, formats_record = ArrayRecord(arrays), ConfigRecord(formats)
    sent = _message_bytes({"arrays": arrays_record, "arrays-format": formats_record})
    bound = _memory_bound(sent, SPECS)

    def decode() -> tuple[dict[str, torch.Tensor] | None, WireFormatError | None]:
        try:
            decoded = decode_tensors(
                arrays_record,
                formats_record,
                expected=SPECS,
                fmt=fmt,
                allow_float=allow_float,
                max_bytes=WIRE_BOUNDARY.limit,
            )
        except WireFormatError as err:  # anything else fails the test
            return None, err
        return decoded, None

    decode()  # first-call warm-ups (lazy imports, caches) are not the message's doing
    with traced_peak() as memory:
        decoded, error = decode()

    note(f"decoder: {error!r}; peak {memory['peak']} bytes for a {sent}-byte message")
    event("refused" if error is not None else "decoded")
    target(memory["peak"] / bound, label="peak / bound")
    if error is not None:
        assert str(error)
    else:
        _assert_matches_specs(decoded, SPECS)
    assert memory["peak"] <= bound, f"decoding a {sent}-byte message allocated {memory['peak']} B"
    return error is not None


WIRE_SETTINGS = {
    "fmt": st.sampled_from(WIRE_FORMATS),
    "allow_float": st.sampled_from([FLOAT_BUFFERS, frozenset()]),
    "seed": st.integers(0, 3),
}


@given(**WIRE_SETTINGS, data=st.data())
def test_wire_decoder_returns_the_specs_or_raises_wire_format_error(fmt, allow_float, seed, data):
    arrays, formats = _honest_wire(fmt, allow_float, seed)
    mutations = _mutate_wire(data, WIRE_BOUNDARY, arrays, formats)

    refused = _assert_decodes_to_specs_or_refuses(arrays, formats, fmt, allow_float)

    assert mutations > 0 or not refused, "an honest message was refused"


@given(**WIRE_SETTINGS, data=st.data())
def test_wire_decoder_survives_hostile_array_payloads(fmt, allow_float, seed, data):
    """The same property, every flaw in one array's payload of an otherwise honest message."""
    arrays, formats = _honest_wire(fmt, allow_float, seed)
    key = data.draw(st.sampled_from(sorted(arrays)), label="array")
    payload = data.draw(st.sampled_from(PAYLOADS), label="payload")
    arrays[key] = payload(data.draw, arrays[key])

    _assert_decodes_to_specs_or_refuses(arrays, formats, fmt, allow_float)


# ----------------------------------------------------------------------------- 2. strategy
#: Guard cap on claimed examples: a reply claiming more is a lie (server.max_num_examples).
MAX_EXAMPLES = 1000
FUZZ_NODE = 10_000  # fuzzed replies come from nodes 10000, 10001, ...
#: Encoded updates of the honest nodes (arrays and formats; metrics are drawn per example).
HONEST = {node: _content(_client_state(node), seed=i) for i, node in enumerate(NODES)}


def _fuzz_strategy() -> LowPrecisionStrategy:
    guard = UpdateGuard(max_weight=MAX_EXAMPLES, max_eval_weight=MAX_EXAMPLES)
    return _wire_strategy(TEMPLATE, guard=guard)


def _honest_content(node: int, metrics: dict) -> RecordDict:
    content = HONEST[node]
    return RecordDict(
        {
            "arrays": content["arrays"],
            "arrays-format": content["arrays-format"],
            "metrics": MetricRecord(metrics),
        }
    )


def _reply_from(request: Message, node: int, content: RecordDict | Error) -> Message:
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _metric_record(values: dict) -> MetricRecord:
    """A MetricRecord holding ``values`` even where Flower's type checks would refuse them."""
    record = MetricRecord()
    record.__dict__["_data"].update(values)
    return record


FINITE = st.floats(-1e6, 1e6)
#: num-examples no honest reply may claim (honest: 0 < n <= MAX_EXAMPLES).
BAD_WEIGHTS = (
    st.floats(max_value=0.0)
    | st.integers(-(2**63), 0)
    | st.floats(min_value=MAX_EXAMPLES + 0.5)
    | st.integers(MAX_EXAMPLES + 1, 2**64 + 1)
    | st.sampled_from([math.nan, math.inf, -math.inf, True, False, "10", b"10", None])
    | st.lists(st.integers(1, 10), max_size=3)
    | st.lists(st.floats(1.0, 10.0), max_size=3)
)
#: Values no other metric may take.
BAD_METRICS = st.sampled_from(
    [math.nan, math.inf, -math.inf, True, "0.5", b"", [0.5, "x"]]
) | st.lists(st.sampled_from([math.nan, math.inf, 1.0]), min_size=2, max_size=3).filter(
    lambda v: not all(map(math.isfinite, v))
)


@st.composite
def bad_metrics(draw, honest: dict) -> dict:
    """Metrics that must get a reply rejected: a bad weight, a bad value, or too many."""
    kind = draw(st.sampled_from(["weight", "other", "too-many", "missing-weight"]), label="bad")
    metrics = dict(honest)
    if kind == "weight":
        metrics["num-examples"] = draw(BAD_WEIGHTS, label="num-examples")
    elif kind == "other":
        metrics[draw(st.sampled_from(["train-loss", "eval-loss", "x"]))] = draw(BAD_METRICS)
    elif kind == "too-many":
        metrics["histogram"] = [1.0] * draw(st.integers(4096, 5000))
    else:
        del metrics["num-examples"]
        if draw(st.booleans()):
            metrics["num-example"] = honest["num-examples"]
    return {k: v for k, v in metrics.items() if v is not None}


@st.composite
def bad_train_content(draw, honest: RecordDict, metrics: dict) -> RecordDict:
    """A train reply that the strategy must refuse, whatever else it gets right."""
    kind = draw(st.sampled_from(["known", "wire", "records", "metrics", "huge"]), label="bad reply")
    event(f"bad train reply: {kind}")
    if kind == "known":  # the hand-written cases of test_strategy, on this reply
        case = draw(st.sampled_from(sorted(BAD_REPLIES)), label="known case")
        return BAD_REPLIES[case][0](honest)
    if kind == "wire":
        return with_item(honest, "arrays", ArrayRecord(draw(invalid_arrays(honest["arrays"]))))
    if kind == "records":
        return draw(bad_records(honest))
    if kind == "metrics":
        return with_item(honest, "metrics", _metric_record(draw(bad_metrics(metrics))))
    # well-formed, but the model scaled far beyond any honest round's update
    scale = draw(st.floats(3, 30), label="log10 scale") * 1.0
    sign = draw(st.sampled_from([1.0, -1.0]), label="sign")
    state = {
        k: v * (sign * 10**scale) if v.is_floating_point() else v
        for k, v in _client_state(NODES[0]).items()
    }
    return _content(state, metrics=metrics)


@st.composite
def invalid_arrays(draw, record: ArrayRecord) -> dict[str, Array]:
    """The reply's arrays with one change no honest encoding makes (so always refused)."""
    arrays = dict(record.items())
    key = draw(st.sampled_from(sorted(arrays)), label="array")
    kind = draw(
        st.sampled_from(["drop", "extra", "cast", "truncate", "stype", "header", "nan"]),
        label="invalid change",
    )
    if kind == "drop":
        del arrays[key]
    elif kind == "extra":
        name = draw(st.sampled_from(["extra", "fc.bias" + EXPONENT_SUFFIX + "x"]) | st.text())
        if name in arrays:  # replacing an existing array is not "extra"
            name += "-extra"
        arrays[name] = arrays[key]
    elif kind == "cast":
        value = arrays[key].numpy()
        dtype = draw(NPY_DTYPES.map(np.dtype).filter(lambda d: d != value.dtype), label="to")
        arrays[key] = Array(value.astype(dtype))
    elif kind == "truncate":
        data = arrays[key].data
        k = draw(st.integers(1, len(data)), label="bytes cut")
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=data[:-k])
    elif kind == "stype":
        a = arrays[key]
        stype = draw(STYPES.filter(lambda s: s != "numpy.ndarray"), label="stype")
        arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=stype, data=a.data)
    elif kind == "header":  # claims more elements than the body holds
        header, body = _npy_parts(arrays[key].data)
        shape, fortran, dtype = _read_npy_header(io.BytesIO(header))
        extra = draw(st.integers(1, 2**20), label="claimed extra elements")
        claimed = _npy_header(dtype.str, (math.prod(shape) + extra,), fortran)
        arrays[key] = Array(dtype="x", shape=(1,), stype="numpy.ndarray", data=claimed + body)
    else:  # a non-finite value in the float32 buffer
        value = arrays["bn.running_var"].numpy().copy()
        value[draw(st.integers(0, value.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        arrays["bn.running_var"] = Array(value)
    return arrays


@st.composite
def bad_records(draw, honest: RecordDict) -> RecordDict:
    kind = draw(
        st.sampled_from(["no-arrays", "no-format", "format-renamed", "format-values"])
        | st.sampled_from(["extra-arrays", "extra-metrics", "no-metrics", "arrays-renamed"]),
        label="records",
    )
    if kind == "no-arrays":
        return with_item(honest, "arrays", None)
    if kind == "no-format":
        return with_item(honest, "arrays-format", None)
    if kind == "format-renamed":
        name = draw(st.sampled_from(["weights-format", "arrays-formats", "format"]))
        return with_item(with_item(honest, name, honest["arrays-format"]), "arrays-format", None)
    if kind == "format-values":  # every description replaced by a non-string
        formats = honest["arrays-format"]
        value = draw(CONFIG_NON_STRINGS, label="format")
        return with_item(
            honest, "arrays-format", ConfigRecord(dict.fromkeys(formats.keys(), value))
        )
    if kind == "extra-arrays":
        extra = ArrayRecord({"x": Array(np.zeros(draw(st.integers(0, 4)), np.float32))})
        return with_item(honest, draw(st.sampled_from(["other", "arrays2"])), extra)
    if kind == "extra-metrics":
        return with_item(honest, "more-metrics", MetricRecord({"num-examples": 5}))
    if kind == "no-metrics":
        return with_item(honest, "metrics", None)
    return with_item(with_item(honest, "weights", honest["arrays"]), "arrays", None)


HONEST_TRAIN_METRICS = st.fixed_dictionaries(
    {"num-examples": st.integers(1, MAX_EXAMPLES), "train-loss": FINITE}
)


def _rejected_nodes(strategy: LowPrecisionStrategy, server_round: int) -> list[int]:
    return sorted(int(r.split(":")[0].split()[1]) for r in strategy.traffic[server_round].rejected)


def _failed_nodes(
    strategy: LowPrecisionStrategy, server_round: int, phase: str = "train"
) -> list[int]:
    traffic = strategy.traffic[server_round]
    failed = traffic.failed if phase == "train" else traffic.failed_evaluate
    return sorted(int(r.split(":")[0].split()[1]) for r in failed)


def _summary(content: RecordDict | Error) -> object:
    """A short description of a reply's content, for Hypothesis' report."""
    if isinstance(content, Error):
        return f"Error({content.reason!r})"
    summary = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            summary[key] = {
                k: f"{a.stype}:{a.dtype}{list(a.shape)}:{len(a.data)}B" for k, a in record.items()
            }
        else:
            summary[key] = {
                k: v if len(repr(v)) < 60 else f"{repr(v)[:60]}..." for k, v in record.items()
            }
    return summary


@dataclass
class Batch:
    """One round's replies: the valid ones, and the nodes whose replies must not count."""

    valid: list[tuple[int, RecordDict]]
    replies: list[tuple[int, RecordDict | Error]]
    rejected: list[int]
    failed: list[int]

    def __repr__(self) -> str:
        replies = "\n".join(f"    node {n}: {_summary(c)}" for n, c in self.replies)
        return (
            f"Batch(valid nodes {[n for n, _ in self.valid]}, must be rejected {self.rejected}, "
            f"failed {self.failed}, replies in order:\n{replies})"
        )


@st.composite
def reply_batches(draw, honest_metrics, honest_content, bad_content) -> Batch:
    """Valid replies of some nodes plus bad ones (fuzzed, duplicates, errors), shuffled.

    Fuzzed replies come from nodes of their own; a duplicate repeats a valid node's reply
    exactly (whichever of the two comes first counts, the other is rejected).
    """
    nodes = draw(st.lists(st.sampled_from(NODES), unique=True, max_size=len(NODES)), label="valid")
    valid = [(n, draw(honest_metrics, label=f"metrics of {n}")) for n in nodes]
    replies: list[tuple[int, RecordDict | Error]] = [(n, honest_content(n, m)) for n, m in valid]
    rejected, failed = [], []
    for i in range(draw(st.integers(0, 5), label="bad replies")):
        node = FUZZ_NODE + i
        kind = draw(st.sampled_from(["fuzzed", "duplicate", "error"]), label=f"bad reply {i}")
        event(f"reply: {kind}")
        if kind == "duplicate" and valid:
            dup, metrics = draw(st.sampled_from(valid), label="duplicated")
            replies.append((dup, honest_content(dup, metrics)))
            rejected.append(dup)
        elif kind == "error":
            replies.append((node, Error(code=0, reason=draw(st.text(max_size=20)))))
            failed.append(node)
        else:
            if valid:
                base, metrics = draw(st.sampled_from(valid), label="based on")
            else:
                base, metrics = NODES[0], draw(honest_metrics, label="based on")
            replies.append((node, draw(bad_content(honest_content(base, metrics), metrics))))
            rejected.append(node)
    order = draw(st.permutations(range(len(replies))), label="order")
    return Batch(
        valid=[(n, honest_content(n, m)) for n, m in valid],
        replies=[replies[i] for i in order],
        rejected=sorted(rejected),
        failed=sorted(failed),
    )


def _aggregate_train(batch_replies) -> tuple[LowPrecisionStrategy, tuple]:
    strategy = _fuzz_strategy()
    request = _requests(strategy, template=TEMPLATE)[0]  # the round's reference model
    replies = [_reply_from(request, node, content) for node, content in batch_replies]
    return strategy, strategy.aggregate_train(1, replies)


def _clients_part(record: MetricRecord | None) -> MetricRecord | None:
    """A round's aggregated client metrics, without the strategy's traffic counts (which
    differ with the rejected replies); None when no client metric is left."""
    if record is None:
        return None
    clients = {k: v for k, v in record.items() if not is_traffic_metric(k)}
    return MetricRecord(clients) if clients else None


def _assert_same_records(got, expected) -> None:
    if isinstance(got, MetricRecord) or isinstance(expected, MetricRecord):
        got, expected = _clients_part(got), _clients_part(expected)
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        if isinstance(expected, ArrayRecord):
            a, b = got[key].numpy(), expected[key].numpy()
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
        else:
            assert got[key] == expected[key], key


@given(batch=reply_batches(HONEST_TRAIN_METRICS, _honest_content, bad_train_content))
def test_strategy_rejects_every_bad_train_reply_and_aggregates_only_the_valid(batch):
    strategy, (arrays, metrics) = _aggregate_train(batch.replies)
    note(f"rejected: {strategy.traffic[1].rejected}")

    assert _rejected_nodes(strategy, 1) == batch.rejected
    assert _failed_nodes(strategy, 1) == batch.failed
    reference, (ref_arrays, ref_metrics) = _aggregate_train(batch.valid)
    assert reference.traffic[1].rejected == []
    _assert_same_records(arrays, ref_arrays)
    _assert_same_records(metrics, ref_metrics)
    if metrics is not None:
        for value in metrics.values():
            assert all(map(math.isfinite, value if isinstance(value, list) else [value]))


HONEST_EVAL_METRICS = st.fixed_dictionaries(
    {"num-examples": st.integers(1, MAX_EXAMPLES), "eval-loss": FINITE},
    optional={
        "eval-accuracy": st.floats(0, 1),
        "per-class": st.lists(FINITE, min_size=3, max_size=3),
    },
)


@st.composite
def bad_evaluate_content(draw, honest: RecordDict, metrics: dict) -> RecordDict:
    kind = draw(st.sampled_from(["metrics", "extra-metrics", "no-metrics"]), label="bad reply")
    event(f"bad evaluate reply: {kind}")
    if kind == "metrics":
        return RecordDict({"metrics": _metric_record(draw(bad_metrics(metrics)))})
    if kind == "extra-metrics":
        return with_item(honest, "more", MetricRecord(dict(metrics)))
    return RecordDict({"config": ConfigRecord(dict(metrics))})


def _honest_evaluate_content(node: int, metrics: dict) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def _aggregate_evaluate(batch_replies) -> tuple[LowPrecisionStrategy, MetricRecord | None]:
    strategy = _fuzz_strategy()
    request = _requests(strategy, template=TEMPLATE)[0]
    replies = [_reply_from(request, node, content) for node, content in batch_replies]
    return strategy, strategy.aggregate_evaluate(1, replies)


@given(batch=reply_batches(HONEST_EVAL_METRICS, _honest_evaluate_content, bad_evaluate_content))
def test_strategy_rejects_every_bad_evaluate_reply_and_aggregates_only_the_valid(batch):
    strategy, metrics = _aggregate_evaluate(batch.replies)
    note(f"rejected: {strategy.traffic[1].rejected}")

    assert _rejected_nodes(strategy, 1) == batch.rejected
    assert _failed_nodes(strategy, 1, "evaluate") == batch.failed
    _, expected = _aggregate_evaluate(batch.valid)
    _assert_same_records(metrics, expected)
    if metrics is not None:
        for value in metrics.values():
            assert all(map(math.isfinite, value if isinstance(value, list) else [value]))


# ----------------------------------------------------------------------------- 3. ClientApp
CLIENT_RUN_CONFIG = _client_run_config("train.max_steps=1 train.batch_size=8")


@functools.cache
def _client_setup() -> tuple[dict[str, TensorSpec], RecordDict]:
    """The client's model specs and an honest broadcast's content (as the server sends it)."""
    cfg = load_config(CLIENT_RUN_CONFIG)
    model = build_configured_model(cfg)
    specs = specs_of(model.state_dict())
    arrays, formats = encode_tensors(
        {k: v.detach() for k, v in model.state_dict().items()},
        downlink_format(cfg.quantization),
        torch.Generator().manual_seed(0),
    )
    config = ConfigRecord({"server-round": 1})
    return specs, RecordDict({"arrays": arrays, "arrays-format": formats, "config": config})


def _broadcast(records: dict, message_type: str) -> Message:
    message = Message(RecordDict(records), dst_node_id=NODE_ID, message_type=message_type)
    message.metadata.__dict__["_message_id"] = f"fuzzed-{message_type}"
    return message


@contextmanager
def _measured_receive() -> Iterator[list[tuple[int, int]]]:
    """Record (peak bytes, message bytes) of every broadcast the ClientApp's mod decodes."""
    peaks: list[tuple[int, int]] = []
    receive = LowPrecisionMod._decode

    def recording(mod, msg):
        sent = _message_bytes(dict(msg.content.items()))
        tracemalloc.start()
        try:
            return receive(mod, msg)
        finally:
            peaks.append((tracemalloc.get_traced_memory()[1], sent))
            tracemalloc.stop()

    with mock.patch.object(LowPrecisionMod, "_decode", recording):
        yield peaks


def _mutate_records(data, records: dict, specs) -> str:
    """Record-level hostility: records missing, renamed, duplicated, retyped, or huge."""
    kind = data.draw(
        st.sampled_from(
            ["none", "none", "drop", "rename", "retype", "extra", "huge-extra", "format-values"]
        ),
        label="record change",
    )
    if kind == "drop":
        records.pop(data.draw(st.sampled_from(sorted(records)), label="dropped record"), None)
    elif kind == "rename":
        old = data.draw(st.sampled_from(sorted(records)), label="renamed record")
        records[data.draw(st.sampled_from(["weights", "arrays-formats", "config", "x"]))] = (
            records.pop(old)
        )
    elif kind == "retype":  # the arrays as a ConfigRecord, or the formats as an ArrayRecord
        if data.draw(st.booleans(), label="arrays as config"):
            records["arrays"] = ConfigRecord({"x": 1})
        else:
            records["arrays-format"] = ArrayRecord({"x": Array(np.zeros(2, np.int8))})
    elif kind in ("extra", "huge-extra"):
        size = 16 if kind == "extra" else payload_limit(specs) + (1 << 16)
        records["extra"] = ArrayRecord({"x": Array(np.zeros(size, np.uint8))})
    elif kind == "format-values":
        value = data.draw(CONFIG_VALUES, label="every format")
        records["arrays-format"] = ConfigRecord(dict.fromkeys(specs, value))
    return kind


@given(message_type=st.sampled_from(["train", "evaluate"]), data=st.data())
def test_client_app_answers_a_fuzzed_broadcast_or_raises_a_value_error(message_type, data):
    specs, honest = _client_setup()
    arrays, formats = dict(honest["arrays"].items()), dict(honest["arrays-format"].items())
    if data.draw(st.booleans(), label="one hostile array payload"):  # as in the decoder tests
        key = data.draw(st.sampled_from(sorted(arrays)), label="array")
        arrays[key] = data.draw(st.sampled_from(PAYLOADS), label="payload")(data.draw, arrays[key])
        mutations = 1
    else:
        mutations = _mutate_wire(data, Boundary(specs, payload_limit(specs)), arrays, formats)
    records = {
        "arrays": ArrayRecord(arrays),
        "arrays-format": ConfigRecord(formats),
        "config": honest["config"],
    }
    changed = _mutate_records(data, records, specs) != "none"
    message = _broadcast(records, message_type)

    reply, error = None, None
    with _measured_receive() as peaks:
        try:
            reply = client_app(message, _context(CLIENT_RUN_CONFIG))
        except ValueError as err:  # WireFormatError is one; Flower sends an error reply
            error = err
    note(f"error: {error!r}; receive peaks (bytes, message bytes): {peaks}")
    event(f"{type(error).__name__} raised" if error is not None else "answered")

    if reply is not None and reply.has_error():  # the mod refused it: an error reply
        assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION and reply.error.reason
        error = ValueError(reply.error.reason)
    if error is not None:
        assert str(error), "a ClientApp error must say what is wrong"
    else:
        assert isinstance(reply, Message) and not reply.has_error()
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert "metrics" in reply.content.metric_records
        if message_type == "train":  # (its values are the server's to check)
            assert {"arrays", "arrays-format"} <= set(reply.content.keys())
    if mutations == 0 and not changed:
        assert error is None, f"the honest broadcast was refused: {error}"
    for peak, sent in peaks:
        assert peak <= _memory_bound(sent, specs), (
            f"decoding a {sent}-byte broadcast allocated {peak} bytes"
        )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder for this module's files (module scope: Hypothesis reruns the test body)."""
    return tmp_path_factory.mktemp("hostile-fuzz")


@given(
    message_type=st.sampled_from(["train", "evaluate"]),
    config=st.dictionaries(
        st.sampled_from(["server-round", "proximal-mu", "lineage", "other"]),
        CONFIG_VALUES
        | st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -1, 0, 2**62, b"7", "1e3"])
        | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        max_size=3,
    ),
    config_key=st.sampled_from(["config", "config", "configs"]),
)
def test_client_app_answers_a_fuzzed_train_config_or_raises_a_value_error(
    scratch, message_type, config, config_key
):
    _, honest = _client_setup()
    run_config = {**CLIENT_RUN_CONFIG, "train.state_dir": str(scratch / "client-state")}
    records = {"arrays": honest["arrays"], "arrays-format": honest["arrays-format"]}
    records[config_key] = ConfigRecord(config)
    message = _broadcast(records, message_type)

    try:
        reply = client_app(message, _context(run_config))
    except ValueError as err:
        assert str(err), "a ClientApp error must say what is wrong"
    else:
        assert isinstance(reply, Message)
        if reply.has_error():  # refused by the mod, with the reason
            assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION and reply.error.reason
        else:
            assert "metrics" in reply.content.metric_records


# ----------------------------------------------------------------------------- 4. state directory
#: Optimizer state as ``save_optimizer_state`` stores it: a float32 tensor, a BFP8 one, a count.
_STATE_ARRAYS, _STATE_FORMATS = encode_tensors(
    {
        "0.exp_avg": torch.linspace(-1, 1, 6).reshape(2, 3),
        "0.exp_avg_sq": encode(torch.linspace(0, 2, 5), BlockFloat(8)),
        "0.step": torch.tensor(4.0),
    },
    FP32,
)
CLIENT_STATE = RecordDict({STATE_KEY: _STATE_ARRAYS, STATE_KEY + FORMAT_SUFFIX: _STATE_FORMATS})

LINEAGES = (
    st.text()
    | st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
    | st.sampled_from(
        [
            "",
            "..",
            "../" * 4 + "etc",
            "/etc",
            "/",
            "\x00",
            "A" * 32,
            "0" * 31,
            "0" * 33,
            "ab12" * 8 + "\n",
            "ab12" * 8 + "/..",
            "\u0660" * 32,  # Arabic-Indic digits: \d, but not [0-9]
            "\uff41" * 32,  # fullwidth 'a'
        ]
    )
    | st.tuples(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.text(max_size=4)).map("".join)
)


def _tree(base: Path, skip: str | None = None) -> dict[str, bytes | None]:
    """Every path below ``base`` (but ``skip`` and below) with its content (None: folders)."""
    tree = {}
    for path in base.rglob("*"):
        name = path.relative_to(base).as_posix()
        if skip is None or (name != skip and not name.startswith(skip + "/")):
            tree[name] = None if path.is_dir() else path.read_bytes()
    return tree


@functools.cache
def _config_with_state_dir(root: str):
    return load_config({"overrides": "dataset=synthetic", "train.state_dir": root})


@given(
    lineage=LINEAGES,
    partition_id=st.integers(-(2**63), 2**63),
    server_round=st.integers(-3, 10**6),
    where=st.sampled_from(["node-config", "run-config"]),
)
def test_state_directory_stays_inside_the_state_root(
    scratch, lineage, partition_id, server_round, where
):
    base = scratch / "state-directory"
    shutil.rmtree(base, ignore_errors=True)
    root = base / "state"
    root.mkdir(parents=True)
    for sentinel in ("round-1.safetensors", "x.tmp"):  # beside the root, and in it
        (base / sentinel).write_bytes(b"sentinel " + sentinel.encode())
        (root / sentinel).write_bytes(b"sentinel " + sentinel.encode())
    outside, in_root = _tree(base, skip="state"), _tree(root)
    node_config = {"state-dir": str(root)} if where == "node-config" else {}
    cfg = _config_with_state_dir(str(root) if where == "run-config" else "")

    try:
        directory = state_directory(cfg, node_config, f"partition-{partition_id}", lineage)
    except StateDirectoryError as err:
        assert str(err)
        return
    assert directory is not None
    assert directory.resolve().is_relative_to(root.resolve()), directory
    assert directory.resolve() != root.resolve()
    path = write_round_state(directory, server_round, CLIENT_STATE)

    assert path.resolve().is_relative_to(directory.resolve())
    assert _tree(base, skip="state") == outside  # nothing created or deleted beside the root
    after = _tree(root)
    for name, content in in_root.items():  # nor anything that was in the root itself
        assert after.get(name) == content, name
    if server_round >= 0:  # (a negative round's file, "round--1.safetensors", is never read)
        assert read_round_state(directory, server_round + 1) == CLIENT_STATE


# ----------------------------------------------------------------------------- 5./6. files
SAFETENSORS_DTYPES = st.sampled_from(
    ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"]
) | st.sampled_from(["C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "Q4", ""])


#: Bytes an element of each safetensors dtype takes (sub-byte ones left out).
SAFETENSORS_ITEMSIZES = {
    **dict.fromkeys(["F64", "I64", "U64", "C64"], 8),
    **dict.fromkeys(["F32", "I32", "U32"], 4),
    **dict.fromkeys(["F16", "BF16", "I16", "U16"], 2),
    **dict.fromkeys(["I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"], 1),
}


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


@st.composite
def header_edits(draw, raw: bytes) -> bytes:
    """The safetensors header rewritten: a tensor's dtype, shape or offsets, or its length."""
    header, body = _split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names), label="tensor entry")
    entry = dict(header[name])
    kind = draw(
        st.sampled_from(["dtype", "shape", "offsets", "drop", "metadata", "length"]),
        label="header edit",
    )
    if kind == "dtype":
        entry["dtype"] = draw(SAFETENSORS_DTYPES, label="dtype")
        itemsize = SAFETENSORS_ITEMSIZES.get(entry["dtype"])
        start, end = entry["data_offsets"]
        if itemsize and (end - start) % itemsize == 0 and draw(st.booleans(), label="resized"):
            entry["shape"] = [(end - start) // itemsize]  # the same bytes, reinterpreted
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 2**40) | st.integers(-3, 8), max_size=3))
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.lists(st.integers(0, len(body) + 8) | HUGE_INTS, min_size=0, max_size=3)
        )
    elif kind == "drop":
        del header[name]
        return _join_safetensors(header, body)
    elif kind == "metadata":
        metadata = dict(header.get("__metadata__", {}))
        key = draw(st.sampled_from(sorted(metadata) or ["x"]))
        metadata[key] = draw(JSON_VALUES, label="metadata value")
        header["__metadata__"] = metadata
        return _join_safetensors(header, body)
    else:
        joined = _join_safetensors(header, body)
        n = len(joined) - len(body) - 8 + draw(st.integers(-16, 16) | HUGE_INTS, label="length")
        return struct.pack("<Q", n % 2**64) + joined[8:]
    header[name] = entry
    return _join_safetensors(header, body)


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_JSON = st.integers(1, 100_000).map(deep_json)


class FileCase:
    """A damaged file: its new bytes, or a rewrite of its contents with a valid digest."""

    def __init__(
        self, kind: str, raw: bytes | None = None, rewrite: tuple | None = None, original=b""
    ) -> None:
        self.kind, self.raw, self.original = kind, raw, original
        #: ("metadata", key, value), ("drop", key) or ("tensor", name, edit, dtype)
        self.rewrite = rewrite

    def __repr__(self) -> str:
        if self.rewrite is not None:
            return f"FileCase(rewrite={_short(self.rewrite)})"
        if self.kind == "header":
            try:
                header, _ = _split_safetensors(self.raw)
            except Exception:
                return f"FileCase(header length field set to {self.raw[:8].hex()})"
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            metadata = _short(header.get("__metadata__"), 120)
            return f"FileCase(header edited: tensors {entries}, metadata {metadata})"
        raw, original = self.raw, self.original
        changed = [i for i in range(min(len(raw), len(original))) if raw[i] != original[i]]
        edits = ", ".join(f"@{i}: {original[i]:#04x}->{raw[i]:#04x}" for i in changed[:6])
        return f"FileCase({len(original)} -> {len(raw)} bytes; changed {edits or 'none'})"


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@st.composite
def damaged_files(draw, raw: bytes, rewrites) -> FileCase:
    """Bytes changed, truncated or extended; the header edited; or a valid-digest rewrite."""
    kind = draw(st.sampled_from(["bytes", "header", "rewrite"]), label="damage")
    if kind == "bytes":
        return FileCase(kind, raw=draw(edited_bytes(raw)), original=raw)
    if kind == "header":
        return FileCase(kind, raw=draw(header_edits(raw)), original=raw)
    return FileCase(kind, rewrite=draw(rewrites, label="rewrite"))


def _load_verified_bytes(raw: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.safetensors"
        path.write_bytes(raw)
        return load_verified(path)


TENSOR_EDITS = ["nan", "shape", "drop", "rename", "dtype"]


def _write_case(path: Path, case: FileCase, original: bytes) -> None:
    """Write the damaged file; a rewrite keeps the digest valid (save_verified recomputes it)."""
    if case.raw is not None:
        path.write_bytes(case.raw)
        return
    tensors, metadata = _load_verified_bytes(original)
    kind, *args = case.rewrite
    if kind == "metadata":
        key, value = args
        metadata[key] = value
    elif kind == "drop":
        del metadata[args[0]]
    else:
        name, edit, dtype = args
        value = tensors.pop(name)
        if edit == "nan" and value.dtype.kind == "f" and value.size:
            value = value.copy()
            value.reshape(-1)[0] = np.nan
        elif edit in ("nan", "shape"):  # one element more: another element count
            value = np.concatenate([value.reshape(-1), value.reshape(-1)[:1]])
        elif edit == "rename":
            name += ".renamed"
        elif edit == "dtype":
            value = value.astype(dtype)
        if edit != "drop":
            tensors[name] = value
    save_verified(path, tensors, metadata)


#: Other dtypes a tensor may be rewritten in (safetensors stores these).
REWRITE_DTYPES = ["float64", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64"]


@st.composite
def tensor_rewrites(draw, tensors: dict[str, np.ndarray], edits=TENSOR_EDITS) -> tuple:
    name = draw(st.sampled_from(sorted(tensors)), label="tensor")
    edit = draw(st.sampled_from(edits), label="tensor edit")
    dtype = None
    if edit == "dtype":
        others = [d for d in REWRITE_DTYPES if np.dtype(d) != tensors[name].dtype]
        dtype = draw(st.sampled_from(others), label="dtype")
    return ("tensor", name, edit, dtype)


def _is_count(text: str) -> bool:
    """Whether ``text`` is what save_checkpoint writes for a count: a JSON integer >= 0."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- 5. checkpoints
def _checkpoint_original() -> tuple[bytes, Checkpoint, dict[str, TensorSpec]]:
    """A checkpoint with every part: model, moving average, FedAvgM state, RNG, lineage."""
    strategy = _checkpoint_strategy("fedavgm")
    strategy.inner.current_arrays = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    strategy.inner.momentum_vector = [MODEL["w"] * 0.5, np.array(1, dtype=np.int64)]
    strategy.moving_average.average = {k: v.copy() for k, v in MODEL.items()}
    strategy.moving_average.num_updates = 3
    specs = specs_of({k: torch.from_numpy(v) for k, v in MODEL.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), 2, dict(MODEL), strategy)
        original = load_checkpoint(Path(tmp))
        check_fits(original, specs, path)
        return path.read_bytes(), original, specs


CHECKPOINT_RAW, CHECKPOINT, CHECKPOINT_SPECS = _checkpoint_original()
CHECKPOINT_TENSORS, CHECKPOINT_METADATA = _load_verified_bytes(CHECKPOINT_RAW)

#: Counts (round, num_updates) that save_checkpoint never writes.
BAD_COUNTS = (
    st.integers(max_value=-1).map(str)
    | st.sampled_from(["1.5", "true", "null", '"2"', "[2]", "1e400", "", "0x2", "9" * 5000])
    | st.text(max_size=6)
    | DEEP_JSON
).filter(lambda text: not _is_count(text))
BAD_LINEAGES = LINEAGES.filter(
    lambda s: s != "" and not (len(s) == 32 and all(c in "0123456789abcdef" for c in s))
)


@st.composite
def bad_random_states(draw) -> str:
    """``random.getstate()`` as JSON, broken: what no Python ``random`` state looks like."""
    version, internal, gauss = random.Random(5).getstate()
    internal = list(internal)
    kind = draw(
        st.sampled_from(["version", "length", "element", "index", "gauss", "json", "text", "deep"]),
        label="random_state",
    )
    if kind == "version":
        version = draw(st.integers(-3, 10).filter(lambda v: v not in (2, 3)) | st.text(max_size=3))
    elif kind == "length":
        internal = internal[: draw(st.integers(0, len(internal) - 1))]
    elif kind == "element":  # Mersenne Twister words are 32-bit unsigned
        i = draw(st.integers(0, len(internal) - 2))
        internal[i] = draw(
            st.integers(max_value=-1)
            | st.integers(min_value=2**32)
            | st.floats()
            | st.text(max_size=3),
            label="state word",
        )
    elif kind == "index":
        internal[-1] = draw(st.integers(max_value=-1) | st.integers(min_value=625), label="index")
    elif kind == "gauss":  # None or a float
        gauss = draw(st.text(max_size=3) | st.lists(st.integers(), max_size=2) | st.booleans())
    elif kind == "json":
        return json.dumps(draw(JSON_VALUES))
    elif kind == "text":
        return draw(st.text(max_size=20))
    else:
        return deep_json(draw(st.integers(1, 100_000), label="depth"))
    return json.dumps([version, internal, gauss])


def _not_strings(value) -> bool:
    return not isinstance(value, list) or any(not isinstance(v, str) for v in value)


@st.composite
def bad_strategy_metadata(draw) -> str:
    """The 'strategy' entry as save_checkpoint never writes it (not {class, order, none})."""
    honest = json.loads(CHECKPOINT_METADATA["strategy"])
    kind = draw(st.sampled_from(["not-object", "class", "order", "none", "deep"]), label="kind")
    if kind == "not-object":
        return draw(
            st.sampled_from(["0", "[]", '""', "false", "7", '"FedAvgM"', "{not json"])
            | st.builds(json.dumps, JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        )
    if kind == "deep":
        return deep_json(draw(st.integers(1, 100_000), label="depth"))
    if kind == "class":  # a class name is a string
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)), label="class")
    else:  # lists of strings
        value = draw(JSON_VALUES.filter(_not_strings), label=kind)
    return json.dumps({**honest, kind: value})


@st.composite
def checkpoint_rewrites(draw) -> tuple:
    """A self-consistent (valid digest) checkpoint that ``save_checkpoint`` never writes."""
    part = draw(
        st.sampled_from(
            ["round", "num_updates", "random_state", "lineage", "strategy", "drop", "tensor"]
        ),
        label="part",
    )
    if part in ("round", "num_updates"):
        return ("metadata", part, draw(BAD_COUNTS, label=part))
    if part == "random_state":
        return ("metadata", part, draw(bad_random_states()))
    if part == "lineage":
        return ("metadata", part, draw(BAD_LINEAGES, label="lineage"))
    if part == "strategy":
        return ("metadata", part, draw(bad_strategy_metadata()))
    if part == "drop":
        return ("drop", draw(st.sampled_from(["round", "num_updates", "random_state"])))
    return draw(tensor_rewrites(CHECKPOINT_TENSORS))


def _assert_same_arrays(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None):
    assert (a is None) == (b is None)
    if a is not None:
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].tobytes() == b[k].tobytes(), k


@given(damage=damaged_files(CHECKPOINT_RAW, checkpoint_rewrites()))
def test_a_damaged_checkpoint_loads_as_the_original_or_raises_checkpoint_error(scratch, damage):
    directory = scratch / "checkpoint"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    path = directory / CHECKPOINT_NAME
    _write_case(path, damage, CHECKPOINT_RAW)
    note(f"damage: {damage!r}")
    try:
        checkpoint = load_checkpoint(directory)
        assert checkpoint is not None
        check_fits(checkpoint, CHECKPOINT_SPECS, path)
    except CheckpointError as err:
        assert str(path) in str(err), err
        return

    # Loaded without complaint: then it must be the original, field by field.
    assert checkpoint.round == CHECKPOINT.round
    assert checkpoint.num_updates == CHECKPOINT.num_updates
    assert checkpoint.random_state == CHECKPOINT.random_state
    assert checkpoint.lineage == CHECKPOINT.lineage
    assert checkpoint.strategy_class == CHECKPOINT.strategy_class
    assert checkpoint.strategy_none == CHECKPOINT.strategy_none
    _assert_same_arrays(checkpoint.model, CHECKPOINT.model)
    _assert_same_arrays(checkpoint.average, CHECKPOINT.average)
    _assert_same_arrays(checkpoint.strategy, CHECKPOINT.strategy)


# -- 6. client state files
def _state_file_original() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_round_state(Path(tmp), 3, CLIENT_STATE)
        assert read_round_state(Path(tmp), 4) == CLIENT_STATE
        return path.read_bytes()


STATE_RAW = _state_file_original()
STATE_TENSORS, STATE_METADATA = _load_verified_bytes(STATE_RAW)
STATE_FORMATS = json.loads(STATE_METADATA["formats"])
QUANTIZED_STATE = sorted(k for k, v in STATE_FORMATS.items() if "bits" in json.loads(v))


@st.composite
def bad_state_descriptions(draw, name: str) -> object:
    """A description of ``name`` that cannot describe its arrays (as the file holds them)."""
    honest = json.loads(STATE_FORMATS[name])
    numel = math.prod(honest["shape"])
    choices = ["text", "no-shape", "shape", "non-string", "deep"]
    if name in QUANTIZED_STATE:
        choices += ["bits", "layout", "block_size", "unquantized"]
    else:
        choices += ["quantized"]
    kind = draw(st.sampled_from(choices), label="description")
    if kind == "text":
        return draw(st.sampled_from(["{", "", "null", "[]", '"x"', "{}"]) | RAW_FORMATS)
    if kind == "no-shape":
        return json.dumps({k: v for k, v in honest.items() if k != "shape"})
    if kind == "shape":  # any shape of another element count
        shape = draw(st.lists(DIMS, max_size=4).filter(lambda s: math.prod(s) != numel))
        return json.dumps({**honest, "shape": shape})
    if kind == "non-string":
        return draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
    if kind == "deep":
        return deep_json(draw(st.integers(1, 100_000), label="depth"))
    if kind == "bits":  # the file holds int8 codes: 8 bits
        return json.dumps({**honest, "bits": draw(JSON_VALUES.filter(lambda b: b != 8))})
    if kind == "layout":
        layout = draw(JSON_VALUES.filter(lambda v: v not in LAYOUTS), label="layout")
        return json.dumps({**honest, "layout": layout})
    if kind == "block_size":
        block = draw(st.integers(max_value=0) | JSON_VALUES.filter(lambda v: type(v) is not int))
        return json.dumps({**honest, "block_size": block})
    if kind == "unquantized":  # the codes described as a plain tensor, exponents left over
        return json.dumps({"shape": honest["shape"]})
    return json.dumps({**honest, "bits": 8, "layout": "tensor", "block_size": 32})


@st.composite
def state_rewrites(draw) -> tuple:
    """A self-consistent (valid digest) state file that ``write_round_state`` never writes."""
    part = draw(st.sampled_from(["order", "formats", "drop", "tensor"]), label="part")
    if part == "order":
        order = json.loads(STATE_METADATA["order"])
        value = draw(
            st.sampled_from(
                [json.dumps(order[:-1]), json.dumps([*order, "x"]), json.dumps(order * 2), "{"]
            )
            | st.builds(json.dumps, JSON_VALUES)
            | DEEP_JSON,
            label="order",
        )
        return ("metadata", "order", value)
    if part == "formats":
        formats = dict(STATE_FORMATS)
        name = draw(st.sampled_from(sorted(formats)), label="format of")
        kind = draw(st.sampled_from(["description", "drop", "extra", "whole"]), label="formats")
        if kind == "description":
            formats[name] = draw(bad_state_descriptions(name))
        elif kind == "drop":
            del formats[name]
        elif kind == "extra":
            formats[name + ".x"] = formats[name]
        else:
            whole = draw(st.builds(json.dumps, JSON_VALUES) | DEEP_JSON, label="formats")
            return ("metadata", "formats", whole)
        return ("metadata", "formats", json.dumps(formats))
    if part == "drop":
        return ("drop", draw(st.sampled_from(["order", "formats"])))
    # (not "dtype": the file does not say which dtype a plain tensor had, only its shape)
    return draw(tensor_rewrites(STATE_TENSORS, ["shape", "drop", "rename"]))


@given(damage=damaged_files(STATE_RAW, state_rewrites()))
def test_a_damaged_state_file_reads_as_the_original_or_as_none(scratch, damage):
    directory = scratch / "client-state-file"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    _write_case(directory / "round-3.safetensors", damage, STATE_RAW)
    note(f"damage: {damage!r}")

    state = read_round_state(directory, 4)

    assert state is None or state == CLIENT_STATE
