"""End to end: a real ``flwr run . --stream`` simulation on real MNIST, in a private FLWR_HOME."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scripts.flwr_local import (
    kill_local_superlink,
    run_simulation,
    start_simulation,
    superlink_pids,
)
from tests.shared_helpers import mnist_root, private_flwr_home, real_flwr_run

pytestmark = pytest.mark.e2e


def _simulate(tmp_path: Path, overrides: str, num_supernodes: int) -> tuple[int, str, Path]:
    """A real ``flwr run`` of ``overrides`` into ``tmp_path/out``: (exit code, log, out)."""
    return real_flwr_run(tmp_path, f"overrides='{overrides}'", num_supernodes, timeout=600)


def test_flwr_run_trains_8bit_fedavg_with_moving_average(tmp_path: Path) -> None:
    mnist_root()  # the simulation reads the same root (DATA_ROOT or the default cache)
    overrides = (
        "federation.num_rounds=3 federation.num_clients=4 federation.fraction_evaluate=0.5 "
        "partition.scheme=dirichlet partition.alpha=1.0 train.max_steps=40 "
        "server.max_eval_samples=2000"
    )
    code, text, out = _simulate(tmp_path, overrides, num_supernodes=4)
    assert code == 0, text[-3000:]
    assert superlink_pids(tmp_path / "flwr_home") == []  # the local SuperLink was stopped

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
    # federated evaluation on the clients' held-out splits ran and was recorded each round
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_loss"] > 0 for r in rows[1:]), rows
    assert rows[-1]["eval_accuracy"] > 0.4, rows
    assert all(r["train_loss"] > 0 for r in rows[1:]), rows
    assert rows[0]["eval_accuracy"] is None  # round 0 is the initial model: nothing ran


def test_flwr_run_trains_a_batchnorm_model_beyond_round_1(tmp_path: Path) -> None:
    """A BatchNorm model (running statistics, 0-d num_batches_tracked buffers) keeps learning
    after round 1: the paper's ConvNet with BatchNorm, narrow. ResNet-18's BatchNorm layers are
    the same modules; it took 2 minutes a run here, and ``test_models.py`` covers its shapes."""
    mnist_root()
    overrides = (
        "model=convnet model.norm=batch model.width=16 model.depth=2 federation.num_rounds=2 "
        "federation.num_clients=2 federation.fraction_train=1 train.max_steps=2 "
        "server.max_eval_samples=200"
    )
    code, text, out = _simulate(tmp_path, overrides, num_supernodes=2)
    assert code == 0, text[-3000:]
    rows = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # round 2 used to get only error replies: the broadcast was refused
        assert row["failed_clients"] == 0 and row["rejected_updates"] == 0, row
        assert row["uplink_bytes"] > 0, row
    assert "WireFormatError" not in text
    final = load_file(str(out / "model.safetensors"))
    counters = [k for k in final if k.endswith("num_batches_tracked")]
    assert len(counters) == 2
    for key in counters:
        assert final[key].shape == ()
        assert int(final[key]) == 4  # 2 steps in each of 2 rounds


def test_flwr_run_with_clients_at_8_6_and_4_bits(tmp_path: Path) -> None:
    """One federation, three widths: each client trains and uploads at its own, the server
    aggregates them all, and results.json counts the bytes of each width."""
    mnist_root()
    overrides = (
        "federation.num_rounds=2 federation.num_clients=3 federation.fraction_train=1 "
        "partition.scheme=iid train.max_steps=30 server.max_eval_samples=2000 "
        "clients.bits=[8,6,4]"
    )
    code, text, out = _simulate(tmp_path, overrides, num_supernodes=3)
    assert code == 0, text[-3000:]
    rows = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["rejected_updates"] == 0 and row["failed_clients"] == 0, row
        widths = row["bytes_by_bits"]
        up = [widths[f"uplink-{b}bit"] for b in (4, 6, 8)]
        assert 0 < up[0] < up[1] < up[2] and sum(up) == row["uplink_bytes"], row
    # round 1 reaches every client at the default width; round 2 each at its own
    assert set(rows[1]["bytes_by_bits"]) == {
        "uplink-4bit",
        "uplink-6bit",
        "uplink-8bit",
        "downlink-8bit",
    }
    assert {"downlink-4bit", "downlink-6bit", "downlink-8bit"} <= set(rows[2]["bytes_by_bits"])
    assert rows[-1]["accuracy"] > 0.6, rows  # chance is 0.1
    assert "up by width" in text  # the per-round line shows the widths


def test_flwr_run_whose_clients_never_reply_in_time_fails_with_a_clear_error(tmp_path: Path):
    """A real round_timeout that expires: no update arrives, so the run stops and says why."""
    overrides = (
        "dataset=synthetic federation.num_rounds=4 federation.num_clients=2 "
        "federation.round_timeout=0.01 server.max_failed_rounds=1"
    )
    code, text, out = _simulate(tmp_path, overrides, num_supernodes=2)
    assert code == 1, text[-3000:]
    assert "the run ended with status finished:failed" in text
    assert "no client update was accepted in the last 1 rounds" in text
    rows = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0]  # it stopped in round 1, before recording it


def _rounds_recorded(out: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
    except (OSError, ValueError, KeyError):
        return []


def test_flwr_run_killed_part_way_resumes_to_the_uninterrupted_model(tmp_path: Path) -> None:
    """kill -9 a real simulation after round 2, resume it: the final model is bit-identical
    to an uninterrupted run's (here the in-process harness, which matches a real run exactly:
    replies are aggregated in content order, not by node ids, which change on resume)."""
    from flwr.app import Context, RecordDict

    from client_app.app import app as client_app
    from scripts.task_identity import task_identity
    from server_app.app import main
    from tests.flower_harness import InProcessGrid

    overrides = (
        "dataset=synthetic federation.num_rounds=4 federation.num_clients=4 "
        "federation.fraction_train=0.5 train.max_steps=5 train.keep_optimizer_state=true"
    )
    out, home = tmp_path / "out", private_flwr_home(tmp_path)
    run_config = f"overrides='{overrides}' output-dir='{out}'"
    process = start_simulation(run_config, 4, home, log_path=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    try:
        while 2 not in _rounds_recorded(out):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.2)
    finally:
        kill_local_superlink(home)
        process.kill()
        process.wait()
    assert 4 not in _rounds_recorded(out)
    code = run_simulation(
        f"overrides='{overrides} server.resume=true' output-dir='{out}'",
        num_supernodes=4,
        flwr_home=home,
        timeout=600,
        log_path=tmp_path / "resumed.log",
    )
    assert code == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert _rounds_recorded(out) == [0, 1, 2, 3, 4]

    reference = tmp_path / "uninterrupted"
    config = {"overrides": overrides, "output-dir": str(reference)}
    with task_identity():
        main(
            InProcessGrid(client_app, 4, config),
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config),
        )
    resumed, uninterrupted = (load_file(str(d / "model.safetensors")) for d in (out, reference))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert resumed[name].equal(uninterrupted[name]), name
