"""Real MNIST: low-precision training reaches float32's accuracy within a stated margin.

The in-process harness runs the real ServerApp and ClientApp (see tests/flower_harness.py);
the same settings give the same model as a real `flwr run` (tests/test_e2e_simulation.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from scripts.task_identity import task_identity
from server_app.app import main
from tests.flower_harness import InProcessGrid
from tests.shared_helpers import mnist_root

SETTING = (
    "federation.num_rounds=2 federation.num_clients=4 federation.fraction_train=1 "
    "partition.scheme=iid train.max_steps=60 server.max_eval_samples=1000"
)
#: Accuracy points each precision may trail float32 by, after the same 2 rounds.
MARGINS = {"bfp8": 1.5, "mixed": 2.0, "bfp6": 3.0, "bfp4": 6.0}


def _final_accuracy(out: Path, quantization: str) -> float:
    root = mnist_root()
    run_config = {
        "overrides": f"{SETTING} quantization={quantization} dataset.root={root}",
        "output-dir": str(out),
    }
    threads = torch.get_num_threads()
    try:
        with task_identity():
            main(
                InProcessGrid(client_app, 4, run_config),
                Context(
                    run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
                ),
            )
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((out / "results.json").read_text())["rounds"]
    assert all(r["rejected_updates"] == 0 and r["failed_clients"] == 0 for r in rows)
    return 100 * rows[-1]["accuracy"]


@pytest.fixture(scope="module")
def float32_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    accuracy = _final_accuracy(tmp_path_factory.mktemp("fp32"), "fp32")
    assert accuracy > 85, accuracy  # chance is 10%
    return accuracy


@pytest.mark.parametrize("quantization", list(MARGINS))
def test_low_precision_reaches_float32_accuracy(
    tmp_path: Path, float32_accuracy: float, quantization: str
) -> None:
    accuracy = _final_accuracy(tmp_path, quantization)
    assert accuracy >= float32_accuracy - MARGINS[quantization], (accuracy, float32_accuracy)
