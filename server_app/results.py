"""Per-round results: a log line, results.json / results.csv, and plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the ServerApp has no display
import matplotlib.pyplot as plt

MB = 1e6


@dataclass(frozen=True)
class RoundRow:
    """One round's measurements (round 0 is the initial model)."""

    round: int
    accuracy: float
    loss: float
    uplink_bytes: int
    downlink_bytes: int
    fp32_uplink_bytes: int
    fp32_downlink_bytes: int
    seconds: float
    rejected_updates: int = 0
    #: Clients that replied with an error (their ClientApp raised, or the message timed out).
    failed_clients: int = 0
    #: Accepted updates the server norm-clipped (server.update_clip_factor).
    clipped_updates: int = 0
    #: Largest ||w_client - w_broadcast|| / ||w_broadcast|| among accepted updates.
    max_update_norm_ratio: float = 0.0
    #: Clients' mean training loss, and federated evaluation on their held-out splits
    #: (None when no client reported it, e.g. federation.fraction_evaluate=0).
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    #: Bytes by direction and mantissa width, e.g. ``{"uplink-4bit": n, "uplink-8bit": m}``
    #: (clients at different precisions; in results.csv as a JSON object).
    bytes_by_bits: dict[str, int] = field(default_factory=dict)


class ResultsWriter:
    """Collects rows and rewrites results.json/.csv after every round, so nothing is lost."""

    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        self.output_dir = output_dir
        self.config = config
        self.rows: list[RoundRow] = []
        output_dir.mkdir(parents=True, exist_ok=True)

    def load_rows(self, up_to: int) -> None:
        """Take back the rows of rounds <= ``up_to`` from an earlier run's results.json."""
        path = self.output_dir / "results.json"
        if not path.exists():
            self.rows = []
            return
        try:
            rows = json.loads(path.read_text())["rounds"]
            self.rows = [RoundRow(**row) for row in rows if row["round"] <= up_to]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"cannot resume: {path} is damaged ({type(err).__name__}: {err}); move it away "
                "to resume without the earlier rounds' rows"
            ) from None

    def add(self, row: RoundRow) -> None:
        """Record a round and persist everything so far."""
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        """Write results.json and results.csv (atomically replaced)."""
        rows = [asdict(r) for r in self.rows]
        _atomic_write(
            self.output_dir / "results.json",
            json.dumps({"config": self.config, "rounds": rows}, indent=2),
        )
        tmp = self.output_dir / "results.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(RoundRow.__dataclass_fields__))
            writer.writeheader()
            writer.writerows({**r, "bytes_by_bits": json.dumps(r["bytes_by_bits"])} for r in rows)
        tmp.replace(self.output_dir / "results.csv")

    def plot(self) -> list[Path]:
        """accuracy.png (vs round) and accuracy_vs_mb.png (vs cumulative MB communicated)."""
        if not self.rows:
            return []
        rounds = [r.round for r in self.rows]
        accuracy = [100 * r.accuracy for r in self.rows]
        cumulative, fp32_cumulative, total, fp32_total = [], [], 0, 0
        for r in self.rows:
            total += r.uplink_bytes + r.downlink_bytes
            fp32_total += r.fp32_uplink_bytes + r.fp32_downlink_bytes
            cumulative.append(total / MB)
            fp32_cumulative.append(fp32_total / MB)
        title = _title(self.config)
        paths = [self.output_dir / "accuracy.png", self.output_dir / "accuracy_vs_mb.png"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, accuracy, marker="o", markersize=3)
        ax.set(xlabel="round", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(paths[0], dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(cumulative, accuracy, marker="o", markersize=3, label="this run (measured)")
        ax.plot(fp32_cumulative, accuracy, linestyle="--", label="same messages in float32")
        ax.set(
            xlabel="cumulative MB communicated (up + down)", ylabel="test accuracy (%)", title=title
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[1], dpi=120)
        plt.close(fig)
        return paths


def format_row(row: RoundRow, num_rounds: int) -> str:
    """The per-round log line."""
    ratio = (row.uplink_bytes + row.downlink_bytes) / max(
        row.fp32_uplink_bytes + row.fp32_downlink_bytes, 1
    )
    loss = f"{row.loss:.4f}" if math.isfinite(row.loss) else "nan"
    text = (
        f"round {row.round:>3}/{num_rounds}  accuracy {100 * row.accuracy:6.2f}%  loss {loss}  "
        f"up {row.uplink_bytes / MB:7.3f} MB  down {row.downlink_bytes / MB:7.3f} MB  "
        f"({100 * ratio:5.1f}% of fp32)  {row.seconds:6.1f} s"
    )
    if row.rejected_updates:
        text += f"  rejected {row.rejected_updates}"
    if row.eval_accuracy is not None:
        text += f"  clients' accuracy {100 * row.eval_accuracy:6.2f}%"
    if row.failed_clients:
        text += f"  failed {row.failed_clients}"
    if row.clipped_updates:
        text += f"  clipped {row.clipped_updates}"
    widths = {key.rsplit("-", 1)[1] for key in row.bytes_by_bits}
    if len(widths) > 1:  # clients at different precisions
        text += "  up by width " + " ".join(
            f"{key.rsplit('-', 1)[1]}:{value / MB:.3f}"
            for key, value in row.bytes_by_bits.items()
            if key.startswith("uplink")
        )
    return text


def _title(config: dict[str, Any]) -> str:
    try:
        q = config["quantization"]
        bits = "fp32" if q["weight_bits"] == 32 else f"{q['weight_bits']}-bit"
        ma = config["server"]["moving_average"]
        return (
            f"{config['dataset']['name']} / {config['model']['name']} / "
            f"{config['strategy']['name']} / {bits} / MA {ma}"
        )
    except (KeyError, TypeError):
        return "federated training"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
