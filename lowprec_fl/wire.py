"""The Flower wire format: tensors as int mantissas plus int8 exponents, described in-message.

A message carries an ``ArrayRecord`` and a ``ConfigRecord`` of the same name suffixed
``-format``. For each tensor ``name`` the ArrayRecord holds ``name`` (mantissas: int8, int16 or
packed uint8 - or the raw array for float32 and integer tensors) and, when quantized,
``name::exponents`` (int8). The ConfigRecord maps ``name`` to a small JSON object with its
shape and format, so the receiver decodes without guessing. Nothing is ever unpickled: arrays
are read with ``allow_pickle=False`` and formats are JSON.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from flwr.common.serde import recorddict_to_proto

from quantization.codec import QuantizedTensor, encode
from quantization.format import FULL_PRECISION_BITS, BlockFloat
from quantization.state_codec import QuantizedState, StateFormat

EXPONENT_SUFFIX = "::exponents"
#: Suffix of the array holding a low-bit optimizer-state tensor's float32 scales.
SCALES_SUFFIX = "::scales"
FORMAT_SUFFIX = "-format"
#: Most dimensions, and largest dimension, of an accepted array (models are far smaller).
MAX_DIMS, MAX_DIM = 8, 1 << 31
#: Longest accepted format description; real ones are under 100 characters.
MAX_FORMAT_CHARS = 512


class WireFormatError(ValueError):
    """A message's arrays do not describe the expected tensors; the text says what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a received tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing tensor."""
        return cls(tuple(tensor.shape), tensor.dtype)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Specs of a state dict, for validating what peers send."""
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


#: Framing bound per tensor: two arrays' headers (~460 B each), names and the format JSON.
FRAMING_BYTES_PER_TENSOR = 2048
#: Bytes a message may carry beyond its tensors (metrics, config, record framing).
MESSAGE_SLACK_BYTES = 1 << 16


def payload_limit(specs: Mapping[str, TensorSpec]) -> int:
    """Most bytes honest tensors of these specs take in any format, framing included.

    Every format is at most 4 bytes a value (float32), integer tensors travel raw; so a
    message above this limit (plus ``MESSAGE_SLACK_BYTES``) carries something else.
    """
    total = 0
    for spec in specs.values():
        itemsize = torch.empty(0, dtype=spec.dtype).element_size()
        total += max(4, itemsize) * math.prod(spec.shape) + FRAMING_BYTES_PER_TENSOR
    return total


def encode_tensors(
    tensors: Mapping[str, torch.Tensor | QuantizedTensor | QuantizedState],
    fmt: BlockFloat,
    generator: torch.Generator | None = None,
    keep_float: Container[str] = (),
) -> tuple[ArrayRecord, ConfigRecord]:
    """Encode a state dict: floats in ``fmt`` (except names in ``keep_float``), others raw.

    ``QuantizedTensor`` values travel as they are; floats go as float32 when ``fmt`` is 32-bit.
    ``QuantizedState`` values (low-bit optimizer state, the client's own files only) travel
    as their codes and a ``SCALES_SUFFIX`` array.
    """
    arrays: dict[str, Array] = {}
    formats: dict[str, str] = {}
    for name, value in tensors.items():
        if EXPONENT_SUFFIX in name or SCALES_SUFFIX in name:
            raise ValueError(
                f"tensor name {name!r} may not contain {EXPONENT_SUFFIX!r} or {SCALES_SUFFIX!r}"
            )
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if fmt.enabled and name not in keep_float:
                value = encode(value, fmt, generator)
            else:
                value = value.detach().to(torch.float32)
        if isinstance(value, QuantizedState):
            codes, scales = value.to_payload()
            arrays[name] = Array(codes)
            arrays[name + SCALES_SUFFIX] = Array(scales)
            formats[name] = json.dumps(
                {"shape": list(value.shape), "state": dataclasses.asdict(value.fmt)}
            )
        elif isinstance(value, QuantizedTensor):
            mantissas, exponents = value.to_payload()
            arrays[name] = Array(mantissas)
            arrays[name + EXPONENT_SUFFIX] = Array(exponents)
            formats[name] = _describe(value.shape, value.fmt)
        else:
            # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
            arrays[name] = Array(np.asarray(value.detach().cpu().numpy(), order="C"))
            formats[name] = json.dumps({"shape": list(value.shape)})
    return ArrayRecord(arrays), ConfigRecord(formats)


def _describe(shape: tuple[int, ...], fmt: BlockFloat) -> str:
    return json.dumps(
        {"shape": list(shape), "bits": fmt.bits, "layout": fmt.layout, "block_size": fmt.block_size}
    )


def decode_tensors(
    arrays: ArrayRecord,
    formats: ConfigRecord,
    expected: Mapping[str, TensorSpec] | None = None,
    bits: int | None = None,
    allow_float: Container[str] = (),
    max_bytes: int | None = None,
    fmt: BlockFloat | None = None,
) -> dict[str, torch.Tensor]:
    """Decode and validate tensors; raises ``WireFormatError`` naming the first problem.

    ``expected`` pins names, shapes and dtypes. ``fmt`` pins the format of every float tensor:
    its mantissa width and its blocks (the number of elements sharing an exponent, for each
    shape), so a peer cannot relabel a tensor with huge blocks that decode to padded gigabytes;
    32 bits means plain float32. ``bits`` pins the width only (for callers that accept any
    layout). Names in ``allow_float`` may also come as float32. ``max_bytes`` caps the payload:
    the arrays plus the format descriptions. Float tensors come back as float32.
    """
    if fmt is not None:
        if bits is not None and bits != fmt.bits:
            raise ValueError(f"bits={bits} contradicts fmt={fmt.describe()}")
        bits = fmt.bits
    if max_bytes is not None:
        size = arrays.count_bytes() + _formats_bytes(formats)
        if size > max_bytes:
            raise WireFormatError(f"payload of {size} bytes exceeds the limit of {max_bytes}")
    names = list(formats.keys())
    if expected is not None:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        if missing or extra:
            raise WireFormatError(f"tensor names differ: missing {missing[:5]}, extra {extra[:5]}")
    described = _parse_formats(formats)
    _check_array_keys(arrays, described)
    decoded = {}
    for name, description in described.items():
        spec = expected[name] if expected is not None else None
        value = _read_one(name, arrays, description, spec, bits, allow_float, fmt)
        tensor = value.decode() if isinstance(value, QuantizedTensor) else value
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireFormatError(f"{name!r} contains NaN or inf")
        decoded[name] = tensor
    return decoded


def message_format(formats: ConfigRecord, accepted: Mapping[int, BlockFloat]) -> BlockFloat:
    """The format in ``accepted`` (by width) whose width a message's tensors use.

    All quantized tensors of one message share a width; a message of float32 tensors only is
    32-bit. Raises ``WireFormatError`` for mixed or unaccepted widths. The blocks are checked
    later, by ``decode_tensors`` with the returned format.
    """
    widths = {d["bits"] for d in _parse_formats(formats).values() if "bits" in d}
    if len(widths) > 1:
        raise WireFormatError(f"its tensors mix mantissa widths {sorted(widths, key=str)}")
    width = widths.pop() if widths else FULL_PRECISION_BITS
    if isinstance(width, bool) or not isinstance(width, int) or width not in accepted:
        raise WireFormatError(
            f"its tensors have {width}-bit mantissas; accepted widths: {sorted(accepted)}"
        )
    return accepted[width]


def read_tensors(
    arrays: ArrayRecord, formats: ConfigRecord
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Read tensors back as written (``QuantizedTensor`` stays quantized).

    For the client's own state: names and shapes come from the format record, not from a
    model; every array must belong to a described tensor (``WireFormatError`` otherwise).
    """
    described = _parse_formats(formats)
    _check_array_keys(arrays, described)
    return {
        name: _read_state(name, arrays, description)
        if "state" in description
        else _read_one(name, arrays, description, None, None, (), None)
        for name, description in described.items()
    }


def _read_state(name: str, arrays: ArrayRecord, description: dict) -> QuantizedState:
    """A low-bit optimizer-state tensor: its format, codes and scales, checked."""
    try:
        fields = description["state"]
        if not isinstance(fields, dict):
            raise TypeError("'state' must be an object")
        fmt = StateFormat(**fields)
        codes = _numpy(name, arrays[name])
        scales = _numpy(name + SCALES_SUFFIX, arrays[name + SCALES_SUFFIX])
        return QuantizedState.from_payload(codes, scales, description["shape"], fmt)
    except (ValueError, TypeError) as err:
        raise WireFormatError(f"optimizer state {name!r} is invalid: {err}") from None


def _check_array_keys(arrays: ArrayRecord, described: Mapping[str, dict]) -> None:
    """Arrays must be exactly the described tensors plus the exponents of quantized ones
    (and the scales of low-bit state)."""
    exponent_keys = {n + EXPONENT_SUFFIX for n, d in described.items() if "bits" in d}
    scale_keys = {n + SCALES_SUFFIX for n, d in described.items() if "state" in d}
    wanted_keys = set(described) | exponent_keys | scale_keys
    if set(arrays.keys()) != wanted_keys:
        missing = sorted(wanted_keys - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - wanted_keys)
        raise WireFormatError(f"array keys differ: missing {missing[:5]}, extra {extra[:5]}")


def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not allowed")


def _int(value: object) -> int:
    """A JSON integer (bools and floats rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _formats_bytes(formats: ConfigRecord) -> int:
    """Bytes of the format descriptions (names and JSON texts)."""
    return sum(
        len(name) + (len(v) if isinstance(v, str | bytes) else 8) for name, v in formats.items()
    )


def _parse_formats(formats: ConfigRecord) -> dict[str, dict]:
    described = {}
    for name, text in formats.items():
        if not isinstance(text, str):
            raise WireFormatError(f"format of {name!r} is not a JSON string")
        if len(text) > MAX_FORMAT_CHARS:
            raise WireFormatError(
                f"format of {name!r} is {len(text)} characters long (at most {MAX_FORMAT_CHARS})"
            )
        try:
            description = json.loads(text, parse_constant=_reject_constant)
            if not isinstance(description, dict) or not isinstance(description["shape"], list):
                raise TypeError("expected an object with a list 'shape'")
            shape = tuple(_int(d) for d in description["shape"])
        except (ValueError, KeyError, TypeError) as err:
            raise WireFormatError(f"format of {name!r} is malformed: {err}") from None
        if any(d < 0 for d in shape) or len(shape) > MAX_DIMS:
            raise WireFormatError(f"format of {name!r} has an invalid shape {shape}")
        description["shape"] = shape
        described[name] = description
    return described


def _numpy(name: str, array: Array) -> np.ndarray:
    """The array's .npy payload, read without trusting its header.

    ``np.load`` allocates the shape a header claims before it reads the data, so a 1 kB
    payload claiming a billion floats reserves 4 GB. The header is parsed first and must
    describe exactly the bytes that follow, in a plain numeric dtype.
    """
    if array.stype != SType.NUMPY:
        raise WireFormatError(f"array {name!r} has serialization type {array.stype!r}")
    data = array.data
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # malformed header: numpy raises several kinds
        raise WireFormatError(f"array {name!r} cannot be read: {err}") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise WireFormatError(f"array {name!r} has unsupported dtype {dtype}")
    if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape):
        raise WireFormatError(f"array {name!r} claims an impossible shape {shape}")
    count = math.prod(shape)
    body = len(data) - stream.tell()
    if count * dtype.itemsize != body:
        raise WireFormatError(
            f"array {name!r} claims shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but carries {body} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _read_one(
    name: str,
    arrays: ArrayRecord,
    description: dict,
    spec: TensorSpec | None,
    bits: int | None,
    allow_float: Container[str],
    expected_fmt: BlockFloat | None,
) -> torch.Tensor | QuantizedTensor:
    shape = description["shape"]
    if "state" in description:
        raise WireFormatError(f"{name!r} is optimizer state, not a model tensor")
    if spec is not None and shape != spec.shape:
        raise WireFormatError(f"{name!r} has shape {shape}, expected {spec.shape}")
    if "bits" in description:
        try:
            fmt = BlockFloat(
                _int(description["bits"]),
                layout=description["layout"],
                block_size=_int(description["block_size"]),
            )
        except (ValueError, TypeError, KeyError) as err:
            raise WireFormatError(f"{name!r} has an invalid format: {err}") from None
        if bits is not None and fmt.bits != bits:
            raise WireFormatError(f"{name!r} has {fmt.bits}-bit mantissas, expected {bits}")
        if expected_fmt is not None and fmt.block_length(shape) != expected_fmt.block_length(shape):
            raise WireFormatError(
                f"{name!r} has blocks of {fmt.block_length(shape)} elements ({fmt.describe()}), "
                f"expected {expected_fmt.block_length(shape)} ({expected_fmt.describe()})"
            )
        if spec is not None and not spec.dtype.is_floating_point:
            raise WireFormatError(f"{name!r} is {spec.dtype} and must travel unquantized")
        mantissas = _numpy(name, arrays[name])
        exponents = _numpy(name + EXPONENT_SUFFIX, arrays[name + EXPONENT_SUFFIX])
        try:
            return QuantizedTensor.from_payload(mantissas, exponents, shape, fmt)
        except ValueError as err:
            raise WireFormatError(f"{name!r}: {err}") from None
    array = _numpy(name, arrays[name])
    if shape == () and array.shape == (1,):  # older senders sent 0-d arrays as 1-d
        array = array.reshape(())
    if tuple(array.shape) != shape:
        raise WireFormatError(f"{name!r} holds shape {array.shape}, described as {shape}")
    if array.dtype.kind not in "biuf":
        raise WireFormatError(f"{name!r} has unsupported dtype {array.dtype}")
    if not array.dtype.isnative:
        raise WireFormatError(f"{name!r} is {array.dtype.str}: arrays must be in native byte order")
    if array.dtype.kind == "f":
        if array.dtype != np.float32:
            raise WireFormatError(f"{name!r} is {array.dtype}; floats travel as float32")
        if bits is not None and bits < FULL_PRECISION_BITS and name not in allow_float:
            raise WireFormatError(f"{name!r} is float32, expected {bits}-bit mantissas")
    tensor = torch.from_numpy(array.copy())
    if spec is not None:
        same_kind = tensor.is_floating_point() == spec.dtype.is_floating_point
        if not same_kind or (not spec.dtype.is_floating_point and tensor.dtype != spec.dtype):
            raise WireFormatError(f"{name!r} has dtype {array.dtype}, expected {spec.dtype}")
    return tensor


def serialized_size(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it (protobuf), framing included."""
    return recorddict_to_proto(content).ByteSize()


def float32_size(tensors: Mapping[str, torch.Tensor], key: str = "arrays") -> int:
    """Serialized bytes of the tensors as a plain float32 ArrayRecord under ``key``."""
    record = ArrayRecord({name: Array(_float32_or_raw(t).numpy()) for name, t in tensors.items()})
    return serialized_size(RecordDict({key: record}))


def _float32_or_raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.to(torch.float32) if t.is_floating_point() else t
