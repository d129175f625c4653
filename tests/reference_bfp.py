"""A plain, loop-over-blocks reference of the method doc's block-floating-point formula."""

from __future__ import annotations

import numpy as np
import torch

from quantization.format import BlockFloat


def reference_exponent(block: np.ndarray) -> int:
    """max over elements of floor(log2|x|), one less for a negative power of two; -128 if zero."""
    nonzero = block[block != 0]
    if nonzero.size == 0:
        return -128
    mantissa, exponent = np.frexp(np.abs(nonzero))
    e = exponent - 1 - ((nonzero < 0) & (mantissa == 0.5)).astype(int)
    return int(np.clip(e.max(), -128, 127))


def reference_quantize(x: torch.Tensor, fmt: BlockFloat, hashes: np.ndarray | None = None):
    """(float64 values, exponents) by the formula, block by block, in float64 numpy.

    Stochastic rounding rounds up where the element's 32-bit hash is below frac * 2^32.
    """
    flat = x.detach().double().numpy().reshape(-1)
    length = fmt.block_length(tuple(x.shape))
    values, exps = np.empty_like(flat), []
    b = fmt.bits
    for start in range(0, flat.size, length):
        block = flat[start : start + length]
        e = reference_exponent(block)
        scaled = block * 2.0 ** (b - 2 - e)
        if fmt.rounding == "stochastic":
            floor = np.floor(scaled)
            threshold = np.floor((scaled - floor) * 2.0**32)
            rounded = floor + (hashes[start : start + length] < threshold)
        elif fmt.rounding == "up":
            rounded = np.ceil(scaled)
        else:
            rounded = np.rint(scaled)
        rounded = np.clip(rounded, -(2 ** (b - 1)), 2 ** (b - 1) - 1)
        values[start : start + length] = rounded * 2.0 ** (e - b + 2)
        exps.append(e)
    return values.reshape(tuple(x.shape)), np.array(exps)
