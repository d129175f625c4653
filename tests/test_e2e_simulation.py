"""End to end: a real ``flwr run . --stream`` simulation on real MNIST, in a private FLWR_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scripts.flwr_local import run_simulation, superlink_pids
from tests.shared_helpers import mnist_root

pytestmark = pytest.mark.e2e


def test_flwr_run_trains_8bit_fedavg_with_moving_average(tmp_path: Path) -> None:
    mnist_root()  # the simulation reads the same root (DATA_ROOT or the default cache)
    out, home, log = tmp_path / "out", tmp_path / "flwr_home", tmp_path / "flwr.log"
    overrides = (
        "federation.num_rounds=3 federation.num_clients=4 federation.fraction_evaluate=0.5 "
        "partition.scheme=dirichlet partition.alpha=1.0 train.max_steps=40 "
        "server.max_eval_samples=2000"
    )
    code = run_simulation(
        run_config=f"overrides='{overrides}' output-dir='{out}'",
        num_supernodes=4,
        flwr_home=home,
        timeout=600,
        log_path=log,
    )
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert superlink_pids(home) == []  # the local SuperLink was stopped

    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert results["config"]["quantization"]["weight_bits"] == 8
    assert rows[-1]["accuracy"] > 0.6, rows  # chance is 0.1
    for row in rows[1:]:
        assert 0 < row["uplink_bytes"] < 0.35 * row["fp32_uplink_bytes"]
        assert 0 < row["downlink_bytes"] < 0.35 * row["fp32_downlink_bytes"]
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "accuracy_vs_mb.png").stat().st_size > 0
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point())
    assert "round   3/3" in text and "accuracy" in text  # the per-round progress line
    assert "eval-accuracy" in text  # federated evaluation on the clients' held-out splits ran
