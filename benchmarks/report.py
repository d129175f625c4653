"""What every benchmark prints and saves: named figures with optional targets, as lines and JSON."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import torch

from quantization.integer_ops import int8_conv_problem

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Figure:
    """One measured figure, its unit and its target (``None``: reported only)."""

    name: str
    value: float
    unit: str
    target: str | None = None
    samples: tuple[float, ...] = ()  # raw per-round measurements, where kept

    def line(self) -> str:
        """``name: value (target <op> <bound>)`` or ``(no target)``: the printed form."""
        value = self.value
        shown = str(int(value)) if value >= 1000 and value == int(value) else f"{value:.4g}"
        return f"{self.name}: {shown} ({f'target {self.target}' if self.target else 'no target'})"

    def met(self) -> bool | None:
        """Whether the target holds (None without one)."""
        if self.target is None:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)


def environment() -> dict[str, object]:
    """Where and how the figures were measured."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "machine": platform.machine(),
        "cpu": torch.cpu.get_capabilities().get("cpu_name"),  # what lscpu calls "Model name"
        # why conv layers stay float32 with train.arithmetic=int8 here, or None
        "int8_conv_problem": int8_conv_problem(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(figures: list[Figure], seconds: float, path: Path) -> Path:
    """Write the figures and the environment as JSON; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "figures": {f.name: {**asdict(f), "met": f.met()} for f in figures},
        "environment": environment(),
        "seconds": seconds,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def print_int8_availability() -> None:
    """Say up front when this CPU has no integer conv route: the int8 figures then time the
    float32 fallback."""
    problem = int8_conv_problem()
    if problem is not None:
        print(f"int8 conv routes unavailable here ({problem}): int8 figures time the fallback")


def print_figures(figures: list[Figure]) -> None:
    """Print one line per figure."""
    for figure in figures:
        print(figure.line(), flush=True)
