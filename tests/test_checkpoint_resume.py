"""Checkpoint and resume: a run killed part-way ends where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from client_app.app import app as client_app
from server_app.app import main
from server_app.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests.flower_harness import InProcessGrid, task_identity

NUM_NODES = 4
OVERRIDES = (
    "dataset=synthetic federation.num_rounds=4 federation.num_clients=4 "
    "federation.fraction_train=0.5 train.max_steps=3 train.keep_optimizer_state=false"
)


class KilledError(RuntimeError):
    """Stands in for the server process dying mid-run."""


def _run(out: Path, extra: str = "", kill_in_round: int | None = None) -> None:
    run_config = {"overrides": f"{OVERRIDES} {extra}".strip(), "output-dir": str(out)}
    calls = {"train": 0}

    def tamper(node_id, reply):
        if reply.metadata.message_type.startswith("train"):
            calls["train"] += 1
            if kill_in_round is not None and calls["train"] > 2 * (kill_in_round - 1):
                raise KilledError(f"killed in round {kill_in_round}")
        return reply

    grid = InProcessGrid(client_app, NUM_NODES, run_config, tamper=tamper)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    main(grid, context)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with task_identity():
        yield
    torch.set_num_threads(threads)


def test_killed_run_resumes_to_the_same_final_state(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(whole)
    with pytest.raises(KilledError):
        _run(resumed, kill_in_round=3)
    checkpoint = load_checkpoint(resumed)
    assert checkpoint is not None and checkpoint.round == 2
    assert not (resumed / "model.safetensors").exists()

    _run(resumed, extra="server.resume=true")

    final_whole = load_file(str(whole / "model.safetensors"))
    final_resumed = load_file(str(resumed / "model.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_resumed[name]), name
    rows_whole = json.loads((whole / "results.json").read_text())["rounds"]
    rows_resumed = json.loads((resumed / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows_resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(rows_whole, rows_resumed, strict=True):
        assert (a["accuracy"], a["loss"], a["uplink_bytes"]) == (
            b["accuracy"],
            b["loss"],
            b["uplink_bytes"],
        )
    assert load_checkpoint(resumed).round == 4


def test_checkpoint_is_replaced_atomically(tmp_path: Path) -> None:
    _run(tmp_path, extra="federation.num_rounds=1")
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert not list(tmp_path.glob("*.tmp"))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 1 and checkpoint.average is not None


def test_resume_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="server.resume=true but .* does not exist"):
        _run(tmp_path, extra="server.resume=true")
