"""Bit packing and the exact wire codec: round trips, sizes, and rejection of bad payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantization import BlockFloat, QuantizedTensor, encode, quantize
from quantization.packing import pack_codes, packed_size, unpack_codes

LAYOUTS = ["tensor", "channel", "kernel", "block", "auto"]
COUNTS = [0, 1, 7, 8, 9, 1001]


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _conv_weight(seed: int = 0) -> torch.Tensor:
    """A conv-shaped tensor with a wide dynamic range, an all-zero kernel and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, 3, 3, generator=g) * torch.exp2(
        torch.randint(-6, 6, (16, 1, 1, 1), generator=g)
    )
    x[2, 3] = 0.0
    x[0, 0, 0, 0] = -0.0
    return x


# --- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", COUNTS)
def test_pack_unpack_round_trip(bits, count):
    rng = np.random.default_rng(bits * 10_000 + count)
    codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=count).astype(np.int8)
    if count >= 2:  # both ends of the range are present
        codes[0], codes[1] = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(count, bits) == math.ceil(count * bits / 8)
    unpacked = unpack_codes(packed, bits, count)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, codes)


def test_packed_sizes():
    assert packed_size(2, 4) == 1 and packed_size(1000, 4) == 500  # 2 per byte
    assert packed_size(4, 6) == 3 and packed_size(8, 6) == 6  # 4 values in 3 bytes
    assert packed_size(4, 2) == 1 and packed_size(1001, 2) == 251  # 4 per byte
    assert packed_size(1, 7) == 1 and packed_size(8, 7) == 7 and packed_size(9, 3) == 4
    assert packed_size(0, 5) == 0
    assert pack_codes(np.array([-8, 7, 1, -1], dtype=np.int8), 4).tolist() == [0x78, 0xF1]


@pytest.mark.parametrize("bits", [2, 4, 6, 7])
def test_wrong_packed_length_raises(bits):
    codes = np.arange(100, dtype=np.int8) % (1 << (bits - 1))
    packed = pack_codes(codes, bits)
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(packed[:-1], bits, 100)
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(np.concatenate([packed, np.zeros(1, np.uint8)]), bits, 100)


# --- encode / QuantizedTensor -------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", range(2, 17))
def test_encode_matches_quantize_and_payload_round_trips(bits, layout):
    fmt = BlockFloat(bits, layout=layout, block_size=32)
    x = _conv_weight(bits)
    q = encode(x, fmt, torch.Generator().manual_seed(bits))
    want = quantize(x, fmt, torch.Generator().manual_seed(bits))
    assert q.shape == tuple(x.shape) and q.fmt == fmt
    assert q.exponents.dtype == torch.int8 and q.exponents.numel() == fmt.num_blocks(x.shape)
    assert torch.equal(_bits_of(q.decode()), _bits_of(want))

    mantissas, exponents = q.to_payload()
    if bits < 8:
        assert mantissas.dtype == np.uint8 and mantissas.size == packed_size(x.numel(), bits)
    else:
        assert mantissas.dtype == (np.int8 if bits == 8 else np.int16)
        assert mantissas.size == x.numel()
    assert exponents.dtype == np.int8 and exponents.size == fmt.num_blocks(x.shape)
    assert q.payload_bytes() == mantissas.nbytes + exponents.nbytes

    back = QuantizedTensor.from_payload(mantissas, exponents, tuple(x.shape), fmt)
    assert back.fmt == fmt and back.codes.dtype == q.codes.dtype
    assert torch.equal(back.codes, q.codes) and torch.equal(back.exponents, q.exponents)
    assert torch.equal(_bits_of(back.decode()), _bits_of(want))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", range(2, 17))
def test_on_grid_tensor_re_encodes_losslessly_and_deterministically(bits, layout):
    fmt = BlockFloat(bits, layout=layout, rounding="stochastic")
    on_grid = quantize(_conv_weight(1), fmt, torch.Generator().manual_seed(0))
    a = encode(on_grid, fmt, torch.Generator().manual_seed(1))
    b = encode(on_grid, fmt, torch.Generator().manual_seed(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.exponents, b.exponents)
    assert torch.equal(a.decode(), on_grid)
    # ... whereas fresh float data does depend on the seed (the check above is not vacuous).
    x = _conv_weight(1)
    fresh_a = encode(x, fmt, torch.Generator().manual_seed(1))
    fresh_b = encode(x, fmt, torch.Generator().manual_seed(2))
    assert not torch.equal(fresh_a.codes, fresh_b.codes)


@pytest.mark.parametrize("bits,mantissa_bytes", [(8, 10_000), (4, 5_000), (6, 7_500), (12, 20_000)])
def test_payload_bytes_of_block32_encoding(bits, mantissa_bytes):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    q = encode(x, BlockFloat(bits, layout="block", block_size=32))
    assert q.payload_bytes() == mantissa_bytes + math.ceil(10_000 / 32)  # 313 exponents


def test_scalar_and_empty_tensors_round_trip():
    fmt = BlockFloat(8, layout="auto")
    for x in [torch.tensor(-3.25), torch.empty(0, 4)]:
        q = encode(x, fmt)
        back = QuantizedTensor.from_payload(*q.to_payload(), tuple(x.shape), fmt)
        assert back.shape == tuple(x.shape) and torch.equal(back.decode(), quantize(x, fmt))


# --- from_payload validation -------------------------------------------------------------


def _payload(bits: int, shape=(4, 3, 3, 3), layout="auto"):
    fmt = BlockFloat(bits, layout=layout)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mantissas, exponents = encode(x, fmt).to_payload()
    return mantissas, exponents, shape, fmt


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_from_payload_rejects_wrong_mantissa_dtype(bits):
    mantissas, exponents, shape, fmt = _payload(bits)
    wrong = mantissas.astype(np.int32)
    with pytest.raises(ValueError, match="mantissas must be"):
        QuantizedTensor.from_payload(wrong, exponents, shape, fmt)
    if bits == 8:  # a uint8 buffer at 8 bits would silently reinterpret negative codes
        with pytest.raises(ValueError, match="mantissas must be int8"):
            QuantizedTensor.from_payload(mantissas.view(np.uint8), exponents, shape, fmt)


@pytest.mark.parametrize("bits", [3, 4, 8, 12])
def test_from_payload_rejects_wrong_mantissa_count(bits):
    mantissas, exponents, shape, fmt = _payload(bits)
    with pytest.raises(ValueError, match="mantissas hold"):
        QuantizedTensor.from_payload(mantissas[:-1], exponents, shape, fmt)
    with pytest.raises(ValueError, match="mantissas hold"):
        QuantizedTensor.from_payload(mantissas, exponents, (5, 3, 3, 3), fmt)


def test_from_payload_rejects_wrong_exponents():
    mantissas, exponents, shape, fmt = _payload(8)
    with pytest.raises(ValueError, match="exponents must be int8"):
        QuantizedTensor.from_payload(mantissas, exponents.astype(np.int16), shape, fmt)
    with pytest.raises(ValueError, match=r"got 11 exponents .* has 12 blocks"):
        QuantizedTensor.from_payload(mantissas, exponents[:-1], shape, fmt)
    with pytest.raises(ValueError, match="exponents"):  # right count for another layout
        QuantizedTensor.from_payload(mantissas, exponents, shape, BlockFloat(8, layout="tensor"))


def test_from_payload_rejects_codes_outside_the_bit_range():
    mantissas, exponents, shape, fmt = _payload(12)
    assert (fmt.code_min, fmt.code_max) == (-2048, 2047)
    for bad in (2048, -2049, 32767):
        wrong = mantissas.copy()
        wrong[5] = bad
        with pytest.raises(ValueError, match="outside the 12-bit range"):
            QuantizedTensor.from_payload(wrong, exponents, shape, fmt)
    edge = mantissas.copy()
    edge[:2] = [-2048, 2047]  # the range's ends are accepted
    back = QuantizedTensor.from_payload(edge, exponents, shape, fmt)
    assert back.codes.reshape(-1)[:2].tolist() == [-2048, 2047]


def test_from_payload_rejects_a_32_bit_format():
    mantissas, exponents, shape, _ = _payload(8)
    with pytest.raises(ValueError, match="32-bit"):
        QuantizedTensor.from_payload(mantissas, exponents, shape, BlockFloat(32))


def test_from_payload_copies_its_input():
    mantissas, exponents, shape, fmt = _payload(8)
    q = QuantizedTensor.from_payload(mantissas, exponents, shape, fmt)
    before = q.decode().clone()
    mantissas[:] = 0
    exponents[:] = 0
    assert torch.equal(q.decode(), before)


def test_from_payload_rejects_a_shape_one_element_short():
    fmt = BlockFloat(4, layout="tensor")
    x = torch.arange(1.0, 11.0)  # 10 codes, the last one nonzero
    mantissas, exponents = encode(x, fmt, torch.Generator().manual_seed(0)).to_payload()
    assert packed_size(9, 4) == packed_size(10, 4) == mantissas.size
    with pytest.raises(ValueError, match="nonzero padding"):
        QuantizedTensor.from_payload(mantissas, exponents, (9,), fmt)
