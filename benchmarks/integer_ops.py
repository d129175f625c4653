"""Each integer product of ``quantization.integer_ops`` against the float32 op it replaces.

Run ``python -m benchmarks.integer_ops``: a 128->128 3x3 conv (padding 1) at batch 32 and
sides 32, 16 and 8 (the paper's ConvNet layers), forward, grad-input and grad-weight, each timed
interleaved with float32 in the same run. Prints ``<name>: <ratio>`` (int8 time over float32
time, the median of paired ratios; below 1 is faster) and writes
``benchmarks/results/integer_ops.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.quantization import interleaved_seconds, paired_ratio
from benchmarks.report import RESULTS_DIR, Figure, write_results
from quantization.integer_ops import (
    Codes,
    ConvGeometry,
    conv2d_forward,
    conv2d_grad_input,
    conv2d_grad_weight,
)

RESULTS_PATH = RESULTS_DIR / "integer_ops.json"
BATCH, CHANNELS, SIDES = 32, 128, (32, 16, 8)
GEOMETRY = ConvGeometry((1, 1), (1, 1), (1, 1))


def _codes(shape: tuple[int, ...], generator: torch.Generator, per_channel: bool) -> Codes:
    codes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    steps = torch.full((shape[0] if per_channel else 1,), 2.0**-6)
    return Codes(codes, steps)


def bench_conv(side: int) -> list[Figure]:
    """Ratios of the three conv products at one side length."""
    generator = torch.Generator().manual_seed(0)
    x = _codes((BATCH, CHANNELS, side, side), generator, per_channel=False)
    dy = _codes((BATCH, CHANNELS, side, side), generator, per_channel=False)
    w = _codes((CHANNELS, CHANNELS, 3, 3), generator, per_channel=True)
    xf, dyf, wf = x.decode(), dy.decode(), w.decode()

    def backward(mask: list[bool]) -> None:
        torch.ops.aten.convolution_backward(
            dyf, xf, wf, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    fns = {
        "fp32_forward": lambda: torch.nn.functional.conv2d(xf, wf, padding=1),
        "int8_forward": lambda: conv2d_forward(x, w, None, GEOMETRY),
        "fp32_grad_input": lambda: backward([True, False, False]),
        "int8_grad_input": lambda: conv2d_grad_input(dy, w, xf.shape, GEOMETRY),
        "fp32_grad_weight": lambda: backward([False, True, False]),
        "int8_grad_weight": lambda: conv2d_grad_weight(dy, x, wf.shape, GEOMETRY),
    }
    samples = interleaved_seconds(fns)
    return [
        Figure(
            f"conv{side}x{side}_{product}_ratio_int8_vs_fp32",
            paired_ratio(samples, f"int8_{product}", f"fp32_{product}"),
            "x",
        )
        for product in ("forward", "grad_input", "grad_weight")
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.integer_ops`` (no options)."""
    return argparse.ArgumentParser(
        prog="python -m benchmarks.integer_ops", description=__doc__.splitlines()[0]
    )


def main(argv: list[str] | None = None) -> None:
    """Time every product at every side, print the ratios, save them."""
    build_parser().parse_args(argv)
    start = time.perf_counter()
    figures: list[Figure] = []
    for side in SIDES:
        for figure in bench_conv(side):
            print(figure.line(), flush=True)
            figures.append(figure)
    print(f"wrote {write_results(figures, time.perf_counter() - start, RESULTS_PATH)}")


if __name__ == "__main__":
    main()
