"""Tabulate and plot a sweep: mean +- std over seeds of the last-5-round accuracy, and bytes."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LAST_ROUNDS = 5  # the paper reports the mean accuracy of the last 5 rounds
MB = 1e6


def _setting(folder: Path) -> tuple[str, str]:
    """(setting without the seed, seed) from a run folder name."""
    parts = folder.name.split("__")
    seed = next((p.split("=", 1)[1] for p in parts if p.startswith("seed=")), "0")
    return "__".join(p for p in parts if not p.startswith("seed=")) or "default", seed


def load_runs(sweep_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """{setting: {seed: rounds}} for every finished run: one whose results reach its
    configured last round (a running or failed run's do not; archived copies keep only
    ``results.json``)."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for path in sorted(sweep_dir.glob("*/results.json")):
        results = json.loads(path.read_text())
        rounds = results["rounds"]
        if not rounds or rounds[-1]["round"] != results["config"]["federation"]["num_rounds"]:
            continue
        setting, seed = _setting(path.parent)
        runs[setting][seed] = rounds
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(sweep_dir: Path) -> list[dict]:
    """Write summary.csv, summary.md, accuracy_vs_round.png and accuracy_vs_mb.png."""
    runs = load_runs(sweep_dir)
    table = []
    for setting, seeds in sorted(runs.items()):
        finals = [
            100 * statistics.fmean(r["accuracy"] for r in rounds[-LAST_ROUNDS:])
            for rounds in seeds.values()
        ]
        up = [sum(r["uplink_bytes"] for r in rounds) / MB for rounds in seeds.values()]
        down = [sum(r["downlink_bytes"] for r in rounds) / MB for rounds in seeds.values()]
        fp32 = [
            sum(r["fp32_uplink_bytes"] + r["fp32_downlink_bytes"] for r in rounds) / MB
            for rounds in seeds.values()
        ]
        mean, std = _mean_std(finals)
        table.append(
            {
                "setting": setting,
                "seeds": len(finals),
                "rounds": max(len(r) - 1 for r in seeds.values()),
                "accuracy_mean": round(mean, 2),
                "accuracy_std": round(std, 2),
                "uplink_mb": round(statistics.fmean(up), 6),
                "downlink_mb": round(statistics.fmean(down), 6),
                "share_of_fp32": round(
                    (statistics.fmean(up) + statistics.fmean(down))
                    / max(statistics.fmean(fp32), 1e-12),
                    4,
                ),
            }
        )
    if not table:
        return table
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = _markdown(table)
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(runs, sweep_dir)
    return table


def _overrides(setting: str) -> dict[str, str]:
    """``{"quantization": "bfp8", ...}`` from ``quantization=bfp8__server.moving_average=0``."""
    return dict(part.split("=", 1) for part in setting.split("__") if "=" in part)


def _markdown(table: list[dict]) -> list[str]:
    """The table with one column per override that varies; the constant ones above it."""
    settings = [_overrides(r["setting"]) for r in table]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    varying = [k for k in keys if len({s.get(k, "") for s in settings}) > 1]
    constant = [f"`{k}={settings[0][k]}`" for k in keys if k not in varying]
    columns = [*varying, "seeds", "rounds", "accuracy (last 5 rounds, %)", "uplink MB"]
    columns += ["downlink MB", "bytes vs fp32"]
    lines = [f"All runs: {', '.join(constant)}.", ""] if constant else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row, setting in zip(table, settings, strict=True):
        cells = [setting.get(k, "") for k in varying]
        cells += [
            str(row["seeds"]),
            str(row["rounds"]),
            f"{row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f}",
            f"{row['uplink_mb']:.2f}",
            f"{row['downlink_mb']:.2f}",
            f"{row['share_of_fp32']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _panels(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """One panel per setting apart from precision, one line per precision (``quantization``
    and its ``quantization.*`` options); warm-up is dropped where averaging is off."""
    panels: dict[str, dict[str, dict]] = defaultdict(dict)
    for setting, seeds in sorted(runs.items()):
        overrides = _overrides(setting)
        if overrides.get("server.moving_average") in ("0", "0.0"):
            overrides.pop("server.moving_average_warmup", None)
        precision = " ".join(
            [overrides.pop("quantization", "default")]
            + [
                f"{k[len('quantization.') :]}={overrides.pop(k)}"
                for k in list(overrides)
                if k.startswith("quantization.")
            ]
        )
        title = "\n".join(f"{k}={v}" for k, v in overrides.items()) or "all runs"
        panels[title][precision] = seeds
    return panels


def _curves(seeds: dict[str, list[dict]]) -> tuple[list[float], list[float], list[float], list]:
    """(cumulative MB, mean accuracy %, std %, rounds) over the rounds every seed reached."""
    length = min(len(r) for r in seeds.values())
    accuracy = [[100 * r[i]["accuracy"] for r in seeds.values()] for i in range(length)]
    mean = [statistics.fmean(a) for a in accuracy]
    std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accuracy]
    first = next(iter(seeds.values()))[:length]
    mb, total = [], 0.0
    for row in first:
        total += (row["uplink_bytes"] + row["downlink_bytes"]) / MB
        mb.append(total)
    return mb, mean, std, [row["round"] for row in first]


def _plot(runs: dict[str, dict[str, list[dict]]], sweep_dir: Path) -> None:
    panels = _panels(runs)
    precisions = sorted({p for lines in panels.values() for p in lines})
    colour = dict(zip(precisions, plt.cm.tab10.colors, strict=False))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    for name, x_label in (
        ("accuracy_vs_round.png", "round"),
        ("accuracy_vs_mb.png", "cumulative MB communicated (up + down)"),
    ):
        fig, axes = plt.subplots(
            rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, sharey=True
        )
        for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
            for precision, seeds in lines.items():
                mb, mean, std, rounds = _curves(seeds)
                x = rounds if x_label == "round" else mb
                ax.plot(x, mean, color=colour[precision], label=f"{precision} ({len(seeds)} seeds)")
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(x, low, high, color=colour[precision], alpha=0.15, linewidth=0)
            ax.set_title(title, fontsize=7)
            ax.set_xlabel(x_label, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy (%), mean ± std")
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=110)
        plt.close(fig)
