"""Simulation cost vs federation size: seconds per round and peak memory, 100 vs 10 clients.

Run ``python -m benchmarks.simulation_scale`` (MNIST from DATA_ROOT, a few minutes). Two real
``flwr run`` simulations do the same work per round - 10 clients train, each for
``train.max_steps`` local steps at 8 bits (15: each of 100 MNIST clients holds 17 batches) - and
differ only in the federation: 10 SuperNodes all sampled, or 100 SuperNodes of which 10% are
sampled. Seconds per round come from the server's results.json (the median of the rounds after the
first, and the first apart: client sampling must not cost more in a larger federation); peak
memory is the largest sum of PSS over every process the run started (the flwr CLI, SuperLink,
simulation engine, Ray and its workers), sampled every 0.25 s. Prints one line per figure and
writes ``benchmarks/results/simulation_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import RESULTS_DIR, Figure, print_figures, write_results
from scripts.flwr_local import run_simulation
from scripts.poller import Poller
from scripts.processes import pids_with_env, proportional_memory

RESULTS_PATH = RESULTS_DIR / "simulation_scale.json"
CLIENTS_PER_ROUND = 10
SAMPLE_EVERY_S = 0.25
MB = 1e6


class PeakMemory(Poller):
    """Samples the summed PSS of every process whose environment names ``flwr_home``."""

    def __init__(self, flwr_home: Path) -> None:
        super().__init__(SAMPLE_EVERY_S)
        self.flwr_home = str(flwr_home.resolve())
        self.peak = 0

    def poll(self) -> None:
        """Add one sample to the peak."""
        pids = pids_with_env("FLWR_HOME", self.flwr_home)
        self.peak = max(self.peak, proportional_memory(pids))


def measure(num_clients: int, rounds: int, max_steps: int, workdir: Path) -> dict[str, float]:
    """Run one simulation of ``num_clients`` SuperNodes; its seconds per round and peak memory."""
    out = workdir / f"{num_clients}-clients"
    overrides = (
        f"federation.num_clients={num_clients} federation.num_rounds={rounds} "
        f"federation.fraction_train={CLIENTS_PER_ROUND / num_clients} "
        f"federation.min_train_clients={CLIENTS_PER_ROUND} train.max_steps={max_steps} "
        "quantization=bfp8 partition.alpha=0.1"
    )
    flwr_home = workdir / f"flwr-home-{num_clients}"
    started = time.perf_counter()
    with PeakMemory(flwr_home) as memory:
        code = run_simulation(
            run_config=f"overrides='{overrides}' output-dir='{out}'",
            num_supernodes=num_clients,
            flwr_home=flwr_home,
            log_path=workdir / f"{num_clients}-clients.log",
        )
    wall = time.perf_counter() - started
    results = out / "results.json"
    if code != 0 or not (out / "model.safetensors").exists():
        raise RuntimeError(f"the {num_clients}-client simulation failed: see {workdir}")
    rows = json.loads(results.read_text())["rounds"]
    per_round = [r["seconds"] for r in rows if r["round"] >= 2]
    return {
        "seconds_per_round": statistics.median(per_round),
        "first_round_seconds": next(r["seconds"] for r in rows if r["round"] == 1),
        "wall_seconds": wall,
        "peak_memory_mb": memory.peak / MB,
    }


def figures(small: dict[str, float], large: dict[str, float], n_small: int, n_large: int) -> list:
    """The per-size figures and the large/small ratios."""
    out = []
    keys = (
        ("seconds_per_round", "s"),
        ("first_round_seconds", "s"),
        ("peak_memory_mb", "MB"),
        ("wall_seconds", "s"),
    )
    for key, unit in keys:
        # Sampling costs what the sample costs, not what the federation holds: the first
        # round (where nodes used to be queried one by one) must not grow with the federation.
        target = "<= 1.5" if key == "first_round_seconds" else None
        out += [
            Figure(f"{key}_{n_small}_clients", small[key], unit),
            Figure(f"{key}_{n_large}_clients", large[key], unit),
            Figure(f"{key}_ratio_{n_large}_vs_{n_small}", large[key] / small[key], "x", target),
        ]
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.simulation_scale``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=15,
        help="local steps per client (100 clients hold 17 batches)",
    )
    parser.add_argument("--sizes", type=int, nargs=2, default=(10, 100), metavar=("SMALL", "LARGE"))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Measure both federation sizes, print the figures and save them."""
    args = build_parser().parse_args(argv)
    n_small, n_large = args.sizes
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="simulation-scale-") as tmp:
        small = measure(n_small, args.rounds, args.max_steps, Path(tmp))
        large = measure(n_large, args.rounds, args.max_steps, Path(tmp))
    result = figures(small, large, n_small, n_large)
    print_figures(result)
    print(f"wrote {write_results(result, time.perf_counter() - start, RESULTS_PATH)}")


if __name__ == "__main__":
    main()
