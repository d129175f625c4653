"""End to end: real ``flwr run`` simulations of ``examples/mnist_lowprec`` on real MNIST.

The example is an ordinary Flower app that adopts the project's building blocks
(``LowPrecisionMod``, ``QuantizedMessages``, ``LowPrecisionOptimizer``, ``attach_quantizers``);
its ``dp_app`` components add Flower's central DP with client-side clipping.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from scripts.flwr_local import PROJECT_DIR, superlink_pids
from tests.shared_helpers import mnist_root, real_flwr_run

pytestmark = pytest.mark.e2e

APP_DIR = PROJECT_DIR / "examples" / "mnist_lowprec"
#: Small and fast: 3 clients, 20 SGD steps each per round, 3 rounds.
FAST = "num-server-rounds=3 max-steps=20"
NUM_SUPERNODES = 3
#: Each run takes 17-35 s on a 2-core machine; the bound leaves room for a busy one.
MAX_RUN_SECONDS = 90


def _flwr_run(tmp_path: Path, app_dir: Path, run_config: str) -> tuple[int, str, Path, float]:
    """A real ``flwr run`` of ``app_dir``: (exit code, log, output dir, seconds)."""
    mnist_root()  # fail clearly here when MNIST is missing; the simulation reads DATA_ROOT
    start = time.monotonic()
    code, text, out = real_flwr_run(tmp_path, run_config, NUM_SUPERNODES, 300, app_dir)
    seconds = time.monotonic() - start
    print(f"flwr run of {app_dir.name} ({run_config}): {seconds:.1f} s")
    assert superlink_pids(tmp_path / "flwr_home") == []  # the local SuperLink was stopped
    return code, text, out, seconds


def _results(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    results = json.loads((out / "results.json").read_text())
    train = {int(r): m for r, m in results["train"].items()}
    evaluate = {int(r): m for r, m in results["evaluate"].items()}
    return train, evaluate


def test_the_example_trains_on_mnist_with_8bit_messages(tmp_path: Path) -> None:
    code, text, out, seconds = _flwr_run(tmp_path, APP_DIR, FAST)
    assert code == 0, text[-3000:]
    assert seconds < MAX_RUN_SECONDS, seconds

    train, evaluate = _results(out)
    assert sorted(train) == sorted(evaluate) == [1, 2, 3]
    for phase in (train, evaluate):
        for metrics in phase.values():
            assert metrics["failed-replies"] == metrics["rejected-replies"] == 0, metrics
            assert 0 < metrics["downlink-bytes"] < 0.35 * metrics["fp32-downlink-bytes"]
    for metrics in train.values():
        assert metrics["uplink-bytes-8bit"] == metrics["uplink-bytes"] > 0, metrics
        assert metrics["uplink-bytes"] < 0.35 * metrics["fp32-uplink-bytes"], metrics
        assert metrics["train_loss"] > 0
    assert train[3]["train_loss"] < train[1]["train_loss"], train
    assert evaluate[3]["eval_acc"] > 0.7, evaluate  # chance is 0.1
    model = torch.load(out / "final_model.pt", weights_only=True)
    assert all(t.isfinite().all() for t in model.values())


def test_the_dp_variant_clips_every_update_and_still_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    dp_text = re.sub(r"(_app):app\"", r'\1:dp_app"', text)
    assert dp_text.count(":dp_app") == 2, dp_text
    pyproject.write_text(dp_text)
    clipping_norm = 1.0

    code, log, out, seconds = _flwr_run(tmp_path, app, f"{FAST} dp.clipping-norm={clipping_norm}")
    assert code == 0, log[-3000:]
    assert seconds < MAX_RUN_SECONDS, seconds
    assert log.count("central DP noise with") == 3, log[-3000:]  # the DP wrapper aggregated

    train, evaluate = _results(out)
    assert sorted(train) == sorted(evaluate) == [1, 2, 3]
    for phase in (train, evaluate):  # fixedclipping_mod runs for training messages only
        for metrics in phase.values():
            assert metrics["failed-replies"] == metrics["rejected-replies"] == 0, metrics
    # Round 1: the clients trained from the initial model; the largest update the server
    # received (dequantized) is at the clipping norm, where unclipped ones are 3.5 to 5 (the
    # same round of the plain example). Uplink rounding after clipping may add a little.
    monkeypatch.syspath_prepend(str(app))
    from mnist_lowprec.task import Net

    torch.manual_seed(0)  # the run config's seed
    initial_norm = torch.cat([t.flatten() for t in Net().state_dict().values()]).norm().item()
    largest_update = train[1]["max-update-norm-ratio"] * initial_norm
    assert 0.9 * clipping_norm < largest_update < 1.02 * clipping_norm, largest_update
    for metrics in train.values():
        assert metrics["uplink-bytes"] < 0.35 * metrics["fp32-uplink-bytes"], metrics
    assert evaluate[3]["eval_acc"] > 0.4, evaluate  # chance is 0.1


def test_the_readme_diff_matches_the_code() -> None:
    """Every line the README's diff adds is in the example's file; no removed line is."""
    readme = (APP_DIR / "README.md").read_text()
    blocks = re.findall(r"```diff\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README shows no diff"
    checked = 0
    for block in blocks:
        source = ""
        for line in block.splitlines():
            if line.startswith("+++ "):
                source = (APP_DIR / line[4:].strip().removeprefix("b/")).read_text()
            elif line.startswith("+") and line[1:].strip():
                assert line[1:] in source.splitlines(), line
                checked += 1
            elif line.startswith("-") and not line.startswith("--- ") and line[1:].strip():
                assert line[1:] not in source.splitlines(), line
    assert checked >= 5
