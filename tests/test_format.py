"""Format validation: clear errors for invalid specs, block geometry for every layout."""

from __future__ import annotations

import pytest

from quantization import BlockFloat


@pytest.mark.parametrize("bits", [0, 1, 17, 31, 33, 64])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
        BlockFloat(bits)


def test_invalid_layout_rounding_and_block_size_rejected():
    with pytest.raises(ValueError, match="unknown layout 'row'"):
        BlockFloat(8, layout="row")
    with pytest.raises(ValueError, match="unknown rounding 'down'"):
        BlockFloat(8, rounding="down")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockFloat(8, layout="block", block_size=0)
    with pytest.raises(TypeError, match="bits must be an int"):
        BlockFloat(8.0)


@pytest.mark.parametrize(
    "layout,shape,length,blocks",
    [
        ("tensor", (128, 64, 3, 3), 128 * 64 * 9, 1),
        ("channel", (128, 64, 3, 3), 64 * 9, 128),
        ("kernel", (128, 64, 3, 3), 9, 128 * 64),
        ("kernel", (10, 2048), 2048, 10),
        ("block", (100,), 32, 4),
        ("auto", (128, 64, 3, 3), 9, 128 * 64),
        ("auto", (10, 2048), 2048, 10),
        ("auto", (128,), 128, 1),
        ("channel", (7,), 7, 1),
        ("tensor", (0, 3), 1, 0),
    ],
)
def test_block_geometry(layout, shape, length, blocks):
    fmt = BlockFloat(8, layout=layout)
    assert fmt.block_length(shape) == length
    assert fmt.num_blocks(shape) == blocks


def test_code_range_and_names():
    fmt = BlockFloat(6, layout="block", block_size=32)
    assert (fmt.code_min, fmt.code_max) == (-32, 31)
    assert fmt.describe() == "bfp6/block32/stochastic"
    assert not BlockFloat(32).enabled and BlockFloat(32).describe() == "fp32"
