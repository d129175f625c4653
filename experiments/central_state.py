"""Optimizer-state formats measured centrally: test accuracy after a fixed number of Adam steps.

The README's setting: the small CNN trained centrally on the first 12,000 MNIST training
images for 300 Adam steps (lr 1e-3, batch 32), weights, gradients, activations and errors at
8 bits, test accuracy on the first 5,000 test images; one run per (state format, seed). Prints
the mean and standard deviation over seeds next to float32 state, and writes
``experiments/results/central-state/results.{json,csv}``:

    DATA_ROOT=../shared/data python -m experiments.central_state --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from lowprec_fl.federated_data.loading import load_image_data
from lowprec_fl.task.config import load_config
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.task.training import evaluate_model, make_optimizer, train_local
from quantization import FP32, BlockFloat, LowBitState, StateFormat, TrainingPrecision

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "central-state"
TRAIN_IMAGES, TEST_IMAGES, STEPS, BATCH, LR = 12_000, 5_000, 300, 32, 1e-3

#: State formats by name: float32, the older BFP state, the low-bit code maps.
STATES: dict[str, BlockFloat | LowBitState] = {
    "fp32": FP32,
    "bfp8": BlockFloat(8, layout="block"),
    "lowbit8": LowBitState.at(8),
    "lowbit4": LowBitState.at(4),
    # Li et al.'s 4-bit second moment (linear map, rank-1 scales), m rounded to nearest
    "lowbit4_linear_rank1": LowBitState(
        StateFormat(4, "dynamic", True, "block", 128), StateFormat(4, "linear", False, "rank1")
    ),
}


def run(state_name: str, seed: int, data, test) -> float:
    """Test accuracy after training one model with the named state format."""
    cfg = load_config({"overrides": "model=small_cnn"})
    torch.manual_seed(seed)
    model = build_configured_model(cfg)
    param = BlockFloat(8, layout="block")  # the project's default weight layout
    precision = replace(
        TrainingPrecision.uniform(8), weight=param, grad=param, state=STATES[state_name]
    )
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, "adam", LR, precision, generator)
    device = torch.device("cpu")
    train_local(
        model,
        optimizer,
        data,
        precision,
        epochs=100,
        batch_size=BATCH,
        generator=generator,
        device=device,
        max_steps=STEPS,
    )
    return evaluate_model(model, test, 1000, device)[1]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.central_state``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--states", nargs="+", default=list(STATES)[:4], choices=list(STATES))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run every (state, seed), print the table and save it."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    ds = load_config({"overrides": "model=small_cnn"}).dataset  # MNIST, as the model expects
    data = load_image_data(ds.name, ds.root or None, train=True, pad_to=ds.pad_to)
    test = load_image_data(ds.name, ds.root or None, train=False, pad_to=ds.pad_to)
    data, test = data.subset(range(TRAIN_IMAGES)), test.subset(range(TEST_IMAGES))
    rows = []
    for name in args.states:
        for seed in args.seeds:
            started = time.perf_counter()
            accuracy = run(name, seed, data, test)
            rows.append({"state": name, "seed": seed, "accuracy": accuracy})
            seconds = time.perf_counter() - started
            print(f"{name:8s} seed {seed}: {100 * accuracy:.2f}%  ({seconds:.0f} s)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "results.json").write_text(json.dumps(rows, indent=1))
    with (RESULTS_DIR / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["state", "seed", "accuracy"])
        writer.writeheader()
        writer.writerows(rows)
    print("\nstate     mean ± std over seeds (test accuracy, %)")
    for name in args.states:
        values = [100 * r["accuracy"] for r in rows if r["state"] == name]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:8s}  {statistics.mean(values):.2f} ± {spread:.2f}")
    print(f"wrote {RESULTS_DIR / 'results.json'}")


if __name__ == "__main__":
    main()
