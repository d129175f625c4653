"""The Flower wire format: exact round trips on real state dicts and one test per rejection."""

from __future__ import annotations

import io
import json
from collections.abc import Container, Mapping

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from lowprec_fl.models import ConvNet, resnet18_cifar
from lowprec_fl.wire import (
    EXPONENT_SUFFIX,
    WireFormatError,
    decode_tensors,
    encode_tensors,
    float32_size,
    read_tensors,
    serialized_size,
    specs_of,
)
from quantization import BlockFloat, quantize, quantize_codes
from quantization.codec import QuantizedTensor
from tests.shared_helpers import with_item

QUANTIZED_BITS = [2, 3, 4, 5, 6, 7, 8]


# ----------------------------------------------------------------------------- helpers
def _convnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in ConvNet(width=8).state_dict().items()}


def _expected_values(
    state: Mapping[str, torch.Tensor],
    fmt: BlockFloat,
    seed: int,
    keep_float: Container[str] = (),
) -> dict[str, torch.Tensor]:
    """What the receiver must get: ``quantize`` with the same generator, in the same order."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and fmt.enabled and name not in keep_float:
            out[name] = quantize(t, fmt, generator)
        else:
            out[name] = t.to(torch.float32) if t.is_floating_point() else t
    return out


def _assert_same(decoded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]):
    assert list(decoded) == list(expected)
    for name, value in expected.items():
        got = decoded[name]
        assert got.dtype == value.dtype, name
        assert got.shape == value.shape, name
        assert torch.equal(got, value), name


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet18_cifar()
    # Non-trivial buffers: running stats and batch counters as after some training.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(123)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["auto", "block"])
@pytest.mark.parametrize("bits", QUANTIZED_BITS)
def test_convnet_round_trip_equals_quantize(bits, layout):
    state = _convnet_state()
    fmt = BlockFloat(bits, layout=layout, block_size=16)
    arrays, formats = encode_tensors(state, fmt, torch.Generator().manual_seed(7))

    decoded = decode_tensors(arrays, formats, expected=specs_of(state), bits=bits)

    _assert_same(decoded, _expected_values(state, fmt, seed=7))
    for name in state:  # mantissas + one int8 exponent array per float tensor
        mantissas = arrays[name].numpy()
        assert mantissas.dtype == (np.int8 if bits == 8 else np.uint8)
        assert mantissas.size == (state[name].numel() * bits + 7) // 8
        exponents = arrays[name + EXPONENT_SUFFIX].numpy()
        assert exponents.dtype == np.int8
        assert exponents.size == fmt.num_blocks(tuple(state[name].shape))
        assert json.loads(formats[name])["bits"] == bits


def test_convnet_round_trip_fp32_is_exact():
    state = _convnet_state()
    arrays, formats = encode_tensors(state, BlockFloat(32))

    assert set(arrays.keys()) == set(state)  # no exponents
    assert all(arrays[name].numpy().dtype == np.float32 for name in state)
    decoded = decode_tensors(arrays, formats, expected=specs_of(state), bits=32)
    _assert_same(decoded, state)


@pytest.mark.parametrize("bits", [2, 8])
def test_read_tensors_returns_the_codes_as_written(bits):
    state = _convnet_state()
    fmt = BlockFloat(bits, layout="auto")
    arrays, formats = encode_tensors(state, fmt, torch.Generator().manual_seed(3))

    read = read_tensors(arrays, formats)
    decoded = decode_tensors(arrays, formats)

    generator = torch.Generator().manual_seed(3)
    for name, t in state.items():
        q = read[name]
        assert isinstance(q, QuantizedTensor)
        assert q.fmt.bits == bits and q.shape == tuple(t.shape)
        codes, exps = quantize_codes(t, fmt, generator)
        assert torch.equal(q.codes.to(codes.dtype), codes), name
        assert torch.equal(q.exponents, exps), name
        assert torch.equal(q.decode(), decoded[name]), name


def test_resnet18_8bit_round_trip_keeps_int_buffers(resnet_state):
    fmt = BlockFloat(8, layout="auto")
    arrays, formats = encode_tensors(resnet_state, fmt, torch.Generator().manual_seed(1))

    int_names = [n for n, t in resnet_state.items() if not t.is_floating_point()]
    assert int_names and all(n.endswith("num_batches_tracked") for n in int_names)
    for name in int_names:  # raw int64, never quantized, no exponents
        assert arrays[name].numpy().dtype == np.int64
        assert name + EXPONENT_SUFFIX not in arrays
        assert "bits" not in json.loads(formats[name])

    decoded = decode_tensors(arrays, formats, expected=specs_of(resnet_state), bits=8)
    _assert_same(decoded, _expected_values(resnet_state, fmt, seed=1))
    assert decoded["bn1.num_batches_tracked"].dtype == torch.int64
    assert decoded["bn1.num_batches_tracked"].shape == ()
    assert int(decoded["bn1.num_batches_tracked"]) == 123


def test_resnet18_keep_float_buffers_travel_as_float32(resnet_state):
    float_buffers = {n for n in resnet_state if n.endswith(("running_mean", "running_var"))}
    fmt = BlockFloat(4, layout="auto")
    arrays, formats = encode_tensors(
        resnet_state, fmt, torch.Generator().manual_seed(2), keep_float=float_buffers
    )

    for name in float_buffers:
        assert arrays[name].numpy().dtype == np.float32
        assert name + EXPONENT_SUFFIX not in arrays
    assert arrays["conv1.weight"].numpy().dtype == np.uint8  # packed 4-bit codes

    decoded = decode_tensors(
        arrays, formats, expected=specs_of(resnet_state), bits=4, allow_float=float_buffers
    )
    _assert_same(decoded, _expected_values(resnet_state, fmt, seed=2, keep_float=float_buffers))
    for name in float_buffers:
        assert torch.equal(decoded[name], resnet_state[name])  # exact


def test_8bit_convnet128_is_about_a_quarter_of_float32():
    torch.manual_seed(0)
    state = ConvNet(width=128).state_dict()
    fp32 = float32_size(state)
    for layout in ("tensor", "block"):  # one exponent per tensor / per 32 values (MXINT8)
        arrays, formats = encode_tensors(state, BlockFloat(8, layout=layout))
        size = serialized_size(RecordDict({"arrays": arrays, "arrays-format": formats}))
        assert size < 0.27 * fp32, (layout, size / fp32)
    # The config's default wire layout (auto = one exponent per 3x3 kernel) costs one more byte
    # per 9 weights: (1 + 1/9) / 4 = 0.278 of float32 before framing.
    arrays, formats = encode_tensors(state, BlockFloat(8, layout="auto"))
    size = serialized_size(RecordDict({"arrays": arrays, "arrays-format": formats}))
    assert size < 0.285 * fp32, size / fp32


# ----------------------------------------------------------------------------- rejections
def _small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3),
        "fc.bias": torch.randn(5),
        "bn.running_var": torch.rand(4) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
    }


FLOAT_BUFFERS = frozenset({"bn.running_var"})


def _encode(bits: int = 8, state=None) -> tuple[ArrayRecord, ConfigRecord]:
    state = _small_state() if state is None else state
    return encode_tensors(
        state,
        BlockFloat(bits, layout="auto"),
        torch.Generator().manual_seed(0),
        keep_float=FLOAT_BUFFERS,
    )


def _decode(arrays, formats, bits: int = 8, **kwargs):
    kwargs.setdefault("expected", specs_of(_small_state()))
    kwargs.setdefault("allow_float", FLOAT_BUFFERS)
    return decode_tensors(arrays, formats, bits=bits, **kwargs)


def test_valid_message_decodes():
    arrays, formats = _encode()
    decoded = _decode(arrays, formats)
    assert decoded["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(decoded["bn.running_var"], _small_state()["bn.running_var"])


def test_missing_tensor_rejected():
    arrays, formats = _encode()
    arrays = with_item(with_item(arrays, "fc.bias", None), "fc.bias::exponents", None)
    formats = with_item(formats, "fc.bias", None)
    with pytest.raises(WireFormatError, match=r"missing \['fc.bias'\]"):
        _decode(arrays, formats)


def test_extra_tensor_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "evil", Array(np.zeros(3, np.float32)))
    formats = with_item(formats, "evil", json.dumps({"shape": [3]}))
    with pytest.raises(WireFormatError, match=r"extra \['evil'\]"):
        _decode(arrays, formats)


def test_extra_array_without_format_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "evil", Array(np.zeros(3, np.float32)))
    with pytest.raises(WireFormatError, match=r"array keys differ.*extra \['evil'\]"):
        _decode(arrays, formats)


def test_missing_exponents_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "fc.bias::exponents", None)
    with pytest.raises(WireFormatError, match=r"missing \['fc.bias::exponents'\]"):
        _decode(arrays, formats)


def test_wrong_shape_in_format_rejected():
    arrays, formats = _encode()
    description = json.loads(formats["conv.weight"])
    description["shape"] = [4, 2, 9]
    formats = with_item(formats, "conv.weight", json.dumps(description))
    with pytest.raises(WireFormatError, match=r"'conv.weight' has shape \(4, 2, 9\), expected"):
        _decode(arrays, formats)


def test_wrong_shape_in_raw_array_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.running_var", Array(np.ones(5, np.float32)))
    with pytest.raises(WireFormatError, match=r"'bn.running_var' holds shape \(5,\), described"):
        _decode(arrays, formats)


def test_wrong_shape_in_mantissas_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "fc.bias", Array(np.zeros(6, np.int8)))
    with pytest.raises(WireFormatError, match=r"'fc.bias'.*mantissas hold 6 values.*needs 5"):
        _decode(arrays, formats)


def test_wrong_bit_width_rejected():
    arrays, formats = _encode(bits=6)
    with pytest.raises(WireFormatError, match="has 6-bit mantissas, expected 8"):
        _decode(arrays, formats, bits=8)


def test_float32_when_bits_requested_rejected():
    arrays, formats = _encode(bits=32)
    with pytest.raises(WireFormatError, match=r"'conv.weight' is float32, expected 8-bit"):
        _decode(arrays, formats, bits=8)
    # allowed for the names in allow_float
    _decode(arrays, formats, bits=8, allow_float={"conv.weight", "fc.bias", "bn.running_var"})


def test_quantized_when_float32_requested_rejected():
    arrays, formats = _encode(bits=8)
    with pytest.raises(WireFormatError, match="has 8-bit mantissas, expected 32"):
        _decode(arrays, formats, bits=32)


def test_32_bit_format_with_mantissas_rejected():
    arrays, formats = _encode()
    description = json.loads(formats["fc.bias"])
    description["bits"] = 32
    formats = with_item(formats, "fc.bias", json.dumps(description))
    with pytest.raises(WireFormatError, match="32-bit format travels as float32"):
        decode_tensors(arrays, formats)


def test_truncated_packed_mantissas_rejected():
    arrays, formats = _encode(bits=4)
    packed = arrays["conv.weight"].numpy()
    assert packed.dtype == np.uint8 and packed.size == 36  # 72 codes, 2 per byte
    arrays = with_item(arrays, "conv.weight", Array(packed[:-1].copy()))
    with pytest.raises(WireFormatError, match=r"'conv.weight'.*mantissas hold 35 values.*36"):
        _decode(arrays, formats, bits=4)


def test_unpacked_mantissas_at_4_bits_rejected():
    arrays, formats = _encode(bits=4)
    arrays = with_item(arrays, "fc.bias", Array(np.zeros(5, np.int8)))
    with pytest.raises(WireFormatError, match="mantissas must be uint8 for 4 bits, got int8"):
        _decode(arrays, formats, bits=4)


def test_wrong_mantissa_dtype_rejected():
    arrays, formats = _encode(bits=8)
    arrays = with_item(arrays, "fc.bias", Array(np.zeros(5, np.int16)))
    with pytest.raises(WireFormatError, match="mantissas must be int8 for 8 bits, got int16"):
        _decode(arrays, formats)


def test_int16_exponents_rejected():
    arrays, formats = _encode()
    exps = arrays["conv.weight::exponents"].numpy().astype(np.int16)
    arrays = with_item(arrays, "conv.weight::exponents", Array(exps))
    with pytest.raises(WireFormatError, match="exponents must be int8, got int16"):
        _decode(arrays, formats)


def test_wrong_exponent_count_rejected():
    arrays, formats = _encode()
    exps = arrays["conv.weight::exponents"].numpy()
    assert exps.size == 8  # one per 3x3 kernel
    arrays = with_item(arrays, "conv.weight::exponents", Array(exps[:-1].copy()))
    with pytest.raises(WireFormatError, match=r"got 7 exponents but layout .* has 8 blocks"):
        _decode(arrays, formats)


def test_16bit_codes_outside_range_rejected():
    state = {"w": torch.randn(10)}
    arrays, formats = encode_tensors(state, BlockFloat(12))
    codes = arrays["w"].numpy().copy()
    assert codes.dtype == np.int16
    codes[0] = 4000  # 12-bit codes are in [-2048, 2047]
    arrays = with_item(arrays, "w", Array(codes))
    with pytest.raises(WireFormatError, match="outside the 12-bit range"):
        decode_tensors(arrays, formats, expected=specs_of(state), bits=12)


def test_nan_in_raw_float_array_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.running_var", Array(np.array([1, np.nan, 1, 1], np.float32)))
    with pytest.raises(WireFormatError, match="'bn.running_var' contains NaN or inf"):
        _decode(arrays, formats)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_in_float_buffer_rejected(bad):
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.running_var", Array(np.array([1, 1, bad, 1], np.float32)))
    with pytest.raises(WireFormatError, match="'bn.running_var' contains NaN or inf"):
        _decode(arrays, formats)


def test_valid_codes_that_overflow_to_inf_rejected():
    """Code -128 with exponent 127 at 8 bits is -2^128: -inf in float32."""
    arrays, formats = _encode()
    arrays = with_item(arrays, "fc.bias", Array(np.full(5, -128, np.int8)))
    arrays = with_item(arrays, "fc.bias::exponents", Array(np.array([127], np.int8)))
    with pytest.raises(WireFormatError, match="'fc.bias' contains NaN or inf"):
        _decode(arrays, formats)


def test_float64_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.running_var", Array(np.ones(4, np.float64)))
    with pytest.raises(WireFormatError, match="is float64; floats travel as float32"):
        _decode(arrays, formats)


def test_int_buffer_with_wrong_dtype_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.num_batches_tracked", Array(np.array(7, np.int32)))
    with pytest.raises(
        WireFormatError, match=r"'bn.num_batches_tracked' has dtype int32, expected torch.int64"
    ):
        _decode(arrays, formats)


def test_int_buffer_sent_as_float_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.num_batches_tracked", Array(np.array(7, np.float32)))
    with pytest.raises(WireFormatError, match="has dtype float32, expected torch.int64"):
        _decode(arrays, formats, allow_float=FLOAT_BUFFERS | {"bn.num_batches_tracked"})


def test_float_tensor_sent_as_bool_rejected():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.running_var", Array(np.ones(4, bool)))
    with pytest.raises(WireFormatError, match="has dtype bool, expected torch.float32"):
        _decode(arrays, formats)


def test_int_buffer_sent_quantized_rejected():
    arrays, formats = _encode()
    q_arrays, q_formats = encode_tensors(
        {"bn.num_batches_tracked": torch.tensor(7.0)}, BlockFloat(8)
    )
    arrays = ArrayRecord({**dict(arrays.items()), **dict(q_arrays.items())})
    formats = with_item(formats, "bn.num_batches_tracked", q_formats["bn.num_batches_tracked"])
    with pytest.raises(WireFormatError, match="is torch.int64 and must travel unquantized"):
        _decode(arrays, formats)


@pytest.mark.parametrize(
    "name,text",
    [
        ("bn.running_var", "not json"),
        ("bn.running_var", "{}"),
        ("bn.running_var", '{"shape": 3}'),
        ("bn.running_var", '{"shape": ["a"]}'),
        ("bn.running_var", "[1, 2]"),
        ("fc.bias", '{"shape": [5], "bits": 8}'),  # no layout / block_size
        ("fc.bias", '{"shape": [5], "bits": "eight", "layout": "auto", "block_size": 32}'),
    ],
)
def test_malformed_format_json_rejected(name, text):
    arrays, formats = _encode()
    formats = with_item(formats, name, text)
    with pytest.raises(WireFormatError, match=f"'{name}'"):
        _decode(arrays, formats)


def test_malformed_format_message_says_malformed():
    arrays, formats = _encode()
    formats = with_item(formats, "fc.bias", "{not json")
    with pytest.raises(WireFormatError, match="format of 'fc.bias' is malformed"):
        _decode(arrays, formats)


def test_invalid_layout_in_format_rejected():
    arrays, formats = _encode()
    description = json.loads(formats["fc.bias"])
    description["layout"] = "bogus"
    formats = with_item(formats, "fc.bias", json.dumps(description))
    with pytest.raises(WireFormatError, match="'fc.bias' has an invalid format: unknown layout"):
        _decode(arrays, formats)


@pytest.mark.parametrize("shape", [[-1], [1] * 9])
def test_invalid_shape_in_format_rejected(shape):
    arrays, formats = _encode()
    formats = with_item(formats, "bn.running_var", json.dumps({"shape": shape}))
    with pytest.raises(WireFormatError, match="format of 'bn.running_var' has an invalid shape"):
        decode_tensors(arrays, formats)


@pytest.mark.parametrize("value", [5, b"{}", ["a"], True])
def test_non_string_format_value_rejected(value):
    arrays, formats = _encode()
    formats = with_item(formats, "fc.bias", value)
    with pytest.raises(WireFormatError, match="format of 'fc.bias' is not a JSON string"):
        _decode(arrays, formats)


def test_max_bytes_exceeded_rejected():
    arrays, formats = _encode()
    # the cap counts the arrays and the format descriptions (names and JSON texts)
    size = arrays.count_bytes() + sum(len(k) + len(v) for k, v in formats.items())
    _decode(arrays, formats, max_bytes=size)  # the limit itself is fine
    with pytest.raises(WireFormatError, match=f"payload of {size} bytes exceeds the limit"):
        _decode(arrays, formats, max_bytes=size - 1)


def test_non_numpy_stype_rejected():
    arrays, formats = _encode()
    bogus = Array(dtype="int8", shape=(3,), stype="bogus", data=b"abc")
    arrays = with_item(arrays, "fc.bias", bogus)
    with pytest.raises(WireFormatError, match="array 'fc.bias' has serialization type 'bogus'"):
        _decode(arrays, formats)


def test_garbage_npy_payload_rejected():
    arrays, formats = _encode()
    garbage = Array(dtype="int8", shape=(5,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
    arrays = with_item(arrays, "fc.bias", garbage)
    with pytest.raises(WireFormatError, match="array 'fc.bias' cannot be read"):
        _decode(arrays, formats)


_UNPICKLED_CALLS: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED_CALLS.append(tag)
    return tag


class _Armed:
    """Unpickling this calls ``_record_unpickling`` (stands in for arbitrary code)."""

    def __reduce__(self):
        return (_record_unpickling, ("executed",))


def test_pickled_object_array_is_never_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Armed(), _Armed()], dtype=object), allow_pickle=True)
    payload = buffer.getvalue()
    # The payload is armed: loading it with pickling allowed runs our function.
    _UNPICKLED_CALLS.clear()
    np.load(io.BytesIO(payload), allow_pickle=True)
    assert _UNPICKLED_CALLS == ["executed", "executed"]
    _UNPICKLED_CALLS.clear()

    arrays, formats = _encode()
    evil = Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=payload)
    arrays = with_item(arrays, "bn.running_var", evil)
    formats = with_item(formats, "bn.running_var", json.dumps({"shape": [2]}))
    with pytest.raises(WireFormatError, match="'bn.running_var' has unsupported dtype object"):
        decode_tensors(arrays, formats)  # no expected spec: the payload is what is checked
    with pytest.raises(WireFormatError):
        read_tensors(arrays, formats)
    assert _UNPICKLED_CALLS == []


@pytest.mark.parametrize("field", ["shape", "bits", "block_size"])
def test_infinity_in_format_json_rejected(field):
    arrays, formats = _encode()
    description = json.loads(formats["fc.bias"])
    description[field] = [float("inf")] if field == "shape" else float("inf")
    text = json.dumps(description)  # json writes Infinity, and json.loads accepts it
    assert "Infinity" in text
    formats = with_item(formats, "fc.bias", text)
    with pytest.raises(WireFormatError, match="'fc.bias'"):
        _decode(arrays, formats)


def test_big_endian_int_buffer_rejected_with_wire_error():
    arrays, formats = _encode()
    arrays = with_item(arrays, "bn.num_batches_tracked", Array(np.array(7, ">i8")))
    with pytest.raises(WireFormatError, match="bn.num_batches_tracked"):
        _decode(arrays, formats)


def test_a_npy_header_claiming_more_than_its_bytes_allocates_nothing():
    """np.load allocates the claimed shape before reading: a 150-byte array claiming 50 M floats
    reserved 200 MB. The header must describe exactly the bytes that follow."""
    import tracemalloc

    arrays, formats = _encode()
    header = {"descr": "<f4", "fortran_order": False, "shape": (50_000_000,)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    lying = Array(
        dtype="float32",
        shape=(50_000_000,),
        stype="numpy.ndarray",
        data=buffer.getvalue() + b"\0" * 8,
    )
    arrays = with_item(arrays, "bn.running_var", lying)
    tracemalloc.start()
    try:
        with pytest.raises(
            WireFormatError, match="claims shape \\(50000000,\\) .* carries 8 bytes"
        ):
            decode_tensors(arrays, formats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
