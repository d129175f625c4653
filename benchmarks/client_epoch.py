"""One client's full local epoch in the real ClientApp: int8 arithmetic, 8-bit fake quantization
and float32, side by side.

Run ``DATA_ROOT=../shared/data python -m benchmarks.client_epoch``. Calls the ClientApp's
``train`` directly (after the mod, as Flower does: the broadcast already decoded to float32)
on partition 0 of the demo's 10 MNIST partitions: the small CNN, one epoch, Adam, one torch
thread (``train.threads``), as a simulated client trains. The variants alternate, and each
ratio is the median over rounds of that round's time against float32's. Writes
``benchmarks/results/client_epoch.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from benchmarks.report import RESULTS_DIR, Figure, print_int8_availability, write_results
from client_app.app import train
from lowprec_fl.protocol import ARRAYS_KEY, CONFIG_KEY, ROUND_KEY
from lowprec_fl.task.config import load_config
from lowprec_fl.task.model import build_configured_model
from scripts.task_identity import task_identity

RESULTS_PATH = RESULTS_DIR / "client_epoch.json"
NODE_ID = 1
#: The demo's federation (conf/config.yaml), one variant per arithmetic.
VARIANTS = {
    "fp32": "quantization=fp32",
    "8bit": "",
    "int8": "quantization.weight_layout=channel train.arithmetic=int8",
}


def _message(run_config: dict) -> Message:
    """Round 1's train message as the ClientApp's ``train`` sees it: the initial model."""
    model = build_configured_model(load_config(run_config))
    arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(v.numpy())) for k, v in model.state_dict().items()}
    )
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    return Message(content, dst_node_id=NODE_ID, message_type="train")


def epoch_seconds(run_config: dict) -> tuple[float, int]:
    """(seconds, training steps) of one call of the ClientApp's ``train``."""
    context = Context(
        run_id=1,
        node_id=NODE_ID,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config=run_config,
    )
    message = _message(run_config)
    start = time.perf_counter()
    reply = train(message, context)
    seconds = time.perf_counter() - start
    return seconds, int(reply.content["metrics"]["train-steps"])


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.client_epoch``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.client_epoch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per variant")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Time every variant's epoch, print the figures, save them."""
    args = build_parser().parse_args(argv)
    with task_identity():
        _run(args.rounds)


def _run(rounds: int) -> None:
    start = time.perf_counter()
    print_int8_availability()
    configs = {name: {"overrides": overrides} for name, overrides in VARIANTS.items()}
    for config in configs.values():  # loads the data, compiles the kernels
        epoch_seconds(config)
    samples: dict[str, list[float]] = {name: [] for name in configs}
    steps = 0
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(list(configs)))
        for name in order:
            seconds, steps = epoch_seconds(configs[name])
            samples[name].append(seconds)
    figures = [Figure("client_epoch_steps", float(steps), "steps")]
    for name in ("8bit", "int8"):
        ratios = [t / b for t, b in zip(samples[name], samples["fp32"], strict=True)]
        figures.append(Figure(f"client_epoch_ratio_{name}_vs_fp32", statistics.median(ratios), "x"))
    figures += [
        Figure(f"client_epoch_{name}_s", statistics.median(t), "s", samples=tuple(t))
        for name, t in samples.items()
    ]
    for figure in figures:
        print(figure.line(), flush=True)
    print(f"wrote {write_results(figures, time.perf_counter() - start, RESULTS_PATH)}")


if __name__ == "__main__":
    main()
