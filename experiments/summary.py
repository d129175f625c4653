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
    """{setting: {seed: rounds}} for every run folder with a results.json."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for path in sorted(sweep_dir.glob("*/results.json")):
        setting, seed = _setting(path.parent)
        runs[setting][seed] = json.loads(path.read_text())["rounds"]
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
    lines = [
        "| setting | seeds | rounds | accuracy (last 5 rounds, %) | uplink MB | downlink MB "
        "| bytes vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['seeds']} | {r['rounds']} | {r['accuracy_mean']:.2f} "
        f"± {r['accuracy_std']:.2f} | {r['uplink_mb']:.2f} | {r['downlink_mb']:.2f} "
        f"| {r['share_of_fp32']:.3f} |"
        for r in table
    ]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(runs, sweep_dir)
    return table


def _plot(runs: dict[str, dict[str, list[dict]]], sweep_dir: Path) -> None:
    fig_round, ax_round = plt.subplots(figsize=(11, 5))
    fig_mb, ax_mb = plt.subplots(figsize=(11, 5))
    for ax in (ax_round, ax_mb):  # 20 distinct colours, solid then dashed
        ax.set_prop_cycle(color=list(plt.cm.tab10.colors) * 2, linestyle=["-"] * 10 + ["--"] * 10)
    for setting, seeds in sorted(runs.items()):
        length = min(len(r) for r in seeds.values())
        mean_acc = [
            100 * statistics.fmean(r[i]["accuracy"] for r in seeds.values()) for i in range(length)
        ]
        rounds = [r["round"] for r in next(iter(seeds.values()))[:length]]
        first = next(iter(seeds.values()))
        mb, total = [], 0.0
        for row in first[:length]:
            total += (row["uplink_bytes"] + row["downlink_bytes"]) / MB
            mb.append(total)
        ax_round.plot(rounds, mean_acc, label=setting)
        ax_mb.plot(mb, mean_acc, label=setting)
    ax_round.set(xlabel="round", ylabel="test accuracy (%), mean over seeds")
    ax_mb.set(xlabel="cumulative MB communicated (up + down)", ylabel="test accuracy (%)")
    for fig, ax, name in (
        (fig_round, ax_round, "accuracy_vs_round.png"),
        (fig_mb, ax_mb, "accuracy_vs_mb.png"),
    ):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=120)
        plt.close(fig)
