"""Run a grid of Hydra settings as real Flower simulations and summarise them.

    python -m experiments.sweep --name mnist-precision --num-supernodes 20 \\
        --base "dataset=mnist model=small_cnn federation.num_rounds=30 federation.num_clients=20" \\
        --axis "quantization=fp32,bfp8,bfp6,bfp4" --axis "server.moving_average=0,0.9" \\
        --axis "partition.alpha=0.1,0.03" --axis "seed=0,1,2"

Each combination is one ``flwr run . --stream`` (via ``scripts.flwr_local``) writing its own
``results.json`` under ``outputs/sweeps/<name>/<combination>/``; finished combinations are
skipped on a rerun, so an interrupted sweep continues where it stopped. ``summary.csv``,
``summary.md`` and plots are rebuilt from whatever results exist.

With ``--archive DIR`` each finished run's ``results.json`` is also copied to
``DIR/<combination>/`` (small enough to commit), a combination archived there counts as
finished, and the summary and plots are built from ``DIR``: a sweep longer than one machine's
session continues from what was committed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from scripts.flwr_local import DEFAULT_FEDERATION_CONFIG, PROJECT_DIR, run_simulation
from scripts.poller import Poller

from .summary import summarise

DEFAULT_ROOT = PROJECT_DIR / "outputs" / "sweeps"


def combinations(axes: Sequence[str]) -> list[list[str]]:
    """Every combination of ``key=v1,v2`` axes, as lists of Hydra overrides."""
    options = []
    for axis in axes:
        key, _, values = axis.partition("=")
        if not key or not values:
            raise ValueError(f"axis {axis!r} is not 'key=value1,value2,...'")
        options.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*options)]


def run_name(overrides: Sequence[str]) -> str:
    """A folder name for one combination, e.g. ``quantization=bfp8__seed=1``."""
    return "__".join(o.replace("/", "-") for o in overrides) or "default"


def run_sweep(
    name: str,
    base: str,
    axes: Sequence[str],
    num_supernodes: int,
    root: Path = DEFAULT_ROOT,
    timeout: float | None = None,
    federation_config: str = DEFAULT_FEDERATION_CONFIG,
    dry_run: bool = False,
    archive: Path | None = None,
) -> Path:
    """Run every combination not finished yet; returns the folder holding the results (the
    sweep folder, or ``archive``)."""
    sweep_dir = root.resolve() / name  # the ServerApp needs an absolute output_dir
    combos = combinations(axes)
    started = time.perf_counter()
    for index, overrides in enumerate(combos, start=1):
        out = sweep_dir / run_name(overrides)
        archived = archive / out.name / "results.json" if archive else None
        if (out / "model.safetensors").exists() or (archived and archived.exists()):
            _archive(out, archived)
            print(f"[{index}/{len(combos)}] {out.name}: done already", flush=True)
            continue
        if dry_run:
            print(f"[{index}/{len(combos)}] {out.name}: would run", flush=True)
            continue
        if out.exists():  # an interrupted attempt: start this run over
            shutil.rmtree(out)
        out.mkdir(parents=True)
        all_overrides = f"{base} {' '.join(overrides)}".strip()
        t0 = time.perf_counter()
        with RoundProgress(out / "flwr.log", f"[{index}/{len(combos)}]"):
            code = run_simulation(
                run_config=f"overrides='{all_overrides}' output-dir='{out}'",
                num_supernodes=num_supernodes,
                flwr_home=sweep_dir / ".flwr_home",
                timeout=timeout,
                log_path=out / "flwr.log",
                extra_federation_config=federation_config,
            )
        rows = _rows(out)
        last = f"accuracy {100 * rows[-1]['accuracy']:.2f}%" if rows else "no results"
        finished = code == 0 and (out / "model.safetensors").exists()  # flwr exits 0 anyway
        status = "ok" if finished else f"FAILED (exit {code}, see {out / 'flwr.log'})"
        if finished:
            _archive(out, archived)
        print(
            f"[{index}/{len(combos)}] {out.name}: {status}, {last}, "
            f"{time.perf_counter() - t0:.0f} s (sweep {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    results_dir = archive if archive else sweep_dir
    summarise(results_dir)
    return results_dir


def _archive(out: Path, archived: Path | None) -> None:
    """Copy a finished run's ``results.json`` to its archive path (if any, and not there)."""
    source = out / "results.json"
    if archived is not None and not archived.exists() and source.exists():
        archived.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, archived)


class RoundProgress(Poller):
    """A progress bar over a running simulation's rounds, read from its log's round lines."""

    PATTERN = re.compile(r"round +(\d+)/(\d+) +accuracy +([\d.]+)%")

    def __init__(self, log_path: Path, label: str, poll_s: float = 1.0) -> None:
        super().__init__(poll_s)
        self.log_path = log_path
        self.last: tuple[str, str, str] | None = None  # (round, rounds, accuracy) last shown
        self._bar = tqdm(desc=label, unit="round", mininterval=2.0, leave=False)

    def poll(self) -> None:
        """Move the bar to the last round line in the log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        rounds = self.PATTERN.findall(text)
        if rounds and rounds[-1] != self.last:
            self.last = done, total, accuracy = rounds[-1]
            self._bar.total = int(total)
            self._bar.n = int(done)
            self._bar.set_postfix_str(f"accuracy {accuracy}%", refresh=False)
            self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._bar.close()


def _rows(out: Path) -> list[dict]:
    path = out / "results.json"
    return json.loads(path.read_text())["rounds"] if path.exists() else []


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.sweep``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="sweep folder under outputs/sweeps")
    parser.add_argument("--base", default="", help="Hydra overrides shared by every run")
    parser.add_argument("--axis", action="append", default=[], help="key=v1,v2,... (repeat)")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument(
        "--federation-config",
        default=DEFAULT_FEDERATION_CONFIG,
        help="more of flwr run's --federation-config, e.g. 'client-resources-num-cpus=2 "
        "client-resources-num-gpus=0.25' to share a GPU between four clients (results do not "
        "depend on it)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs left, run none")
    parser.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="folder (e.g. experiments/results/<name>) that keeps each finished run's "
        "results.json; runs archived there are skipped, and the summary is written there",
    )
    return parser


def main() -> None:
    """Command-line entry point."""
    args = build_parser().parse_args()
    run_sweep(
        args.name,
        args.base,
        args.axis,
        args.num_supernodes,
        args.root,
        args.timeout,
        args.federation_config,
        args.dry_run,
        args.archive.resolve() if args.archive else None,
    )


if __name__ == "__main__":
    main()
