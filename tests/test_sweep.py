"""The sweep harness: combinations, resumable runs, the summary table and plots."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from experiments.summary import summarise
from experiments.sweep import RoundProgress, combinations, run_name, run_sweep
from tests.shared_helpers import private_flwr_home


def test_combinations_cover_the_grid():
    combos = combinations(["quantization=fp32,bfp8", "seed=0,1,2"])
    assert len(combos) == 6
    assert ["quantization=bfp8", "seed=2"] in combos
    assert run_name(["quantization=bfp8", "seed=2"]) == "quantization=bfp8__seed=2"
    with pytest.raises(ValueError, match="key=value1,value2"):
        combinations(["quantization"])


def _fake_run(folder: Path, accuracies: list[float], finished: bool = True) -> None:
    folder.mkdir(parents=True)
    rounds = [
        {
            "round": i,
            "accuracy": a,
            "loss": 1.0,
            "uplink_bytes": 100 * (i > 0),
            "downlink_bytes": 50 * (i > 0),
            "fp32_uplink_bytes": 400 * (i > 0),
            "fp32_downlink_bytes": 200 * (i > 0),
            "seconds": 1.0,
            "rejected_updates": 0,
        }
        for i, a in enumerate(accuracies)
    ]
    # a running (or failed) run has not reached its configured last round
    num_rounds = len(accuracies) - 1 if finished else len(accuracies) + 3
    config = {"federation": {"num_rounds": num_rounds}}
    (folder / "results.json").write_text(json.dumps({"config": config, "rounds": rounds}))


def test_summary_averages_the_last_five_rounds_over_seeds(tmp_path: Path):
    _fake_run(tmp_path / "quantization=bfp8__seed=0", [0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    _fake_run(tmp_path / "quantization=bfp8__seed=1", [0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _fake_run(tmp_path / "quantization=fp32__seed=0", [0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    _fake_run(tmp_path / "quantization=fp32__seed=1", [0.1, 0.9], finished=False)  # running
    table = {row["setting"]: row for row in summarise(tmp_path)}
    bfp8 = table["quantization=bfp8"]
    assert bfp8["seeds"] == 2 and bfp8["rounds"] == 6
    assert bfp8["accuracy_mean"] == pytest.approx(70.0)  # (80 + 60) / 2
    assert bfp8["accuracy_std"] == pytest.approx(14.14, abs=0.01)
    assert bfp8["uplink_mb"] == pytest.approx(600 / 1e6)
    assert bfp8["share_of_fp32"] == pytest.approx(0.25)
    assert table["quantization=fp32"]["accuracy_std"] == 0.0
    assert "± 14.14" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_mb.png").stat().st_size > 0


@pytest.mark.e2e
def test_a_tiny_real_sweep_runs_and_resumes(tmp_path: Path, capsys):
    base = "dataset=synthetic federation.num_rounds=1 federation.num_clients=2 train.max_steps=2"
    axes = ["quantization=fp32,bfp4"]
    private_flwr_home(tmp_path, tmp_path / "tiny" / ".flwr_home")  # the sweep's own FLWR_HOME
    sweep = run_sweep("tiny", base, axes, num_supernodes=2, root=tmp_path, timeout=300)
    rows = {r["setting"]: r for r in summarise(sweep)}
    assert set(rows) == {"quantization=fp32", "quantization=bfp4"}
    assert (
        rows["quantization=bfp4"]["share_of_fp32"]
        < 0.3
        < rows["quantization=fp32"]["share_of_fp32"]
    )
    run_sweep("tiny", base, axes, num_supernodes=2, root=tmp_path, timeout=300)
    assert capsys.readouterr().out.count("done already") == 2

    # archived results survive the sweep folder: a fresh machine skips what was committed
    archive = tmp_path / "committed"
    assert run_sweep("tiny", base, axes, 2, root=tmp_path, archive=archive) == archive
    shutil.rmtree(sweep)
    assert run_sweep("tiny", base, axes, 2, root=tmp_path, archive=archive, timeout=300) == archive
    assert capsys.readouterr().out.count("done already") == 4
    assert {r["setting"] for r in summarise(archive)} == set(rows)
    assert (archive / "summary.md").exists()


class _CountedProgress(RoundProgress):
    """A ``RoundProgress`` whose finished polls can be waited for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.polls = 0
        self._polled = threading.Condition()

    def poll(self) -> None:
        super().poll()  # an exception here ends the thread: the waits below then time out
        with self._polled:
            self.polls += 1
            self._polled.notify_all()

    def wait_for(self, condition, timeout: float = 60.0) -> bool:
        """Wait (generously: a loaded machine is slow) until ``condition()`` after a poll."""
        with self._polled:
            return self._polled.wait_for(condition, timeout)


def test_progress_follows_the_round_lines_of_a_running_simulation(tmp_path: Path):
    log = tmp_path / "flwr.log"
    expected = ("12", "30", "81.50")
    with _CountedProgress(log, "[1/1]", poll_s=0.01) as progress:
        # No log yet: a few polls pass, showing nothing and raising nothing.
        assert progress.wait_for(lambda: progress.polls >= 3)
        assert progress.last is None
        log.write_text(
            "INFO: round   0/30  accuracy   7.28%  loss 2.30\n"
            "INFO: round  12/30  accuracy  81.50%  loss 0.61\n"
        )
        # A poll may read the file half written (round 0 only): wait for the last line.
        assert progress.wait_for(lambda: progress.last == expected)
    assert progress.last == expected
