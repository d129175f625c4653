"""Checkpoint and resume: a run killed part-way ends where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict
from safetensors.torch import load_file

from client_app.app import app as client_app
from client_app.state import (
    DEFAULT_STATE_SUBDIR,
    STATE_KEY,
    read_round_state,
    state_directory,
    write_round_state,
)
from lowprec_fl.task import verified_file
from lowprec_fl.task.config import load_config
from lowprec_fl.task.verified_file import load_verified
from lowprec_fl.wire import FORMAT_SUFFIX, encode_tensors, specs_of
from quantization import FP32
from scripts.task_identity import task_identity
from server_app.app import main
from server_app.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, save_checkpoint
from strategies import state as strategy_state_module
from strategies.factory import INNER_STRATEGIES, build_strategy
from strategies.state import state_attributes
from tests.flower_harness import InProcessGrid

NUM_NODES = 4
OVERRIDES = (
    "dataset=synthetic federation.num_rounds=4 federation.num_clients=4 "
    "federation.fraction_train=0.5 train.max_steps=3"
)


class KilledError(RuntimeError):
    """Stands in for the server process dying mid-run."""


def _run(
    out: Path, extra: str = "", kill_in_round: int | None = None, keep_optimizer_state: bool = False
) -> None:
    keep = f"train.keep_optimizer_state={str(keep_optimizer_state).lower()}"
    run_config = {"overrides": f"{OVERRIDES} {keep} {extra}".strip(), "output-dir": str(out)}
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


def _differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of the final-model tensors that differ between the runs in ``a`` and ``b``."""
    model_a = load_file(str(a / "model.safetensors"))
    model_b = load_file(str(b / "model.safetensors"))
    assert model_a.keys() == model_b.keys()
    return [name for name, t in model_a.items() if not torch.equal(t, model_b[name])]


def _forget_strategy_state(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """Resume without putting the inner strategy's state back."""
    monkeypatch.setattr(strategy_state_module, "load_strategy_state", lambda strategy, arrays: None)


def _forget_client_state(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """Resume without the clients' optimizer-state files."""
    shutil.rmtree(out / DEFAULT_STATE_SUBDIR)


class Case(NamedTuple):
    """A resume scenario, and how to lose the state it needs (None: nothing to lose)."""

    extra: str
    keep_optimizer_state: bool
    forget: Callable[[pytest.MonkeyPatch, Path], None] | None


CASES = {
    "fedavg": Case("", False, None),
    "fedadam": Case("strategy=fedadam", False, _forget_strategy_state),
    "fedavgm": Case("strategy=fedavgm", False, _forget_strategy_state),
    "client-optimizer-state": Case("", True, _forget_client_state),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_same_final_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    extra, keep, forget = CASES[case]
    whole, resumed, forgetful = tmp_path / "whole", tmp_path / "resumed", tmp_path / "forgetful"
    _run(whole, extra, keep_optimizer_state=keep)
    with pytest.raises(KilledError):
        _run(resumed, extra, kill_in_round=3, keep_optimizer_state=keep)
    checkpoint = load_checkpoint(resumed)
    assert checkpoint is not None and checkpoint.round == 2
    assert not (resumed / "model.safetensors").exists()
    if forget is not None:
        shutil.copytree(resumed, forgetful)

    _run(resumed, f"{extra} server.resume=true", keep_optimizer_state=keep)

    assert _differing_tensors(whole, resumed) == []
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

    if forget is not None:  # the state this case restores is what makes the runs agree
        forget(monkeypatch, forgetful)
        _run(forgetful, f"{extra} server.resume=true", keep_optimizer_state=keep)
        assert _differing_tensors(whole, forgetful) != []


class _OsDyingAtTheRename:
    """``os`` as ``lowprec_fl.task.verified_file`` sees it, the process killed in ``os.replace``."""

    def __init__(self) -> None:
        self.renames: list[tuple[Path, Path]] = []

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        self.renames.append((Path(src), Path(dst)))
        raise KilledError("killed between writing the new checkpoint and renaming it")


def _same_arrays(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        for k in a
    )


def test_checkpoint_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path, extra="federation.num_rounds=1")
    path = tmp_path / CHECKPOINT_NAME
    assert not list(tmp_path.glob("*.tmp"))
    old_bytes = path.read_bytes()
    old = load_checkpoint(tmp_path)
    assert old.round == 1 and old.average is not None

    # Resume for a second round and die after the round-2 checkpoint is written, before the
    # rename that would put it in place.
    dying = _OsDyingAtTheRename()
    monkeypatch.setattr(verified_file, "os", dying)
    with pytest.raises(KilledError):
        _run(tmp_path, extra="federation.num_rounds=2 server.resume=true")
    # The old checkpoint is untouched, byte for byte, and loads with its original values...
    assert path.read_bytes() == old_bytes
    survivor = load_checkpoint(tmp_path)
    assert (survivor.round, survivor.num_updates) == (old.round, old.num_updates)
    assert survivor.lineage == old.lineage and survivor.random_state == old.random_state
    assert _same_arrays(survivor.model, old.model) and _same_arrays(survivor.average, old.average)
    assert survivor.strategy_class == old.strategy_class
    # ... while the new one had been written in full, to the side, when the rename died.
    tmp = path.with_name(path.name + ".tmp")
    assert dying.renames == [(tmp, path)]
    _, written = load_verified(tmp)
    assert written["round"] == "2"

    # Resuming again (the crash over) continues from round 1 and replaces it cleanly.
    monkeypatch.undo()
    _run(tmp_path, extra="federation.num_rounds=2 server.resume=true")
    assert load_checkpoint(tmp_path).round == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="server.resume=true but .* does not exist"):
        _run(tmp_path, extra="server.resume=true")


# ----------------------------------------------------------------------------- strategy state
#: A model with a 0-d integer buffer (like BatchNorm's num_batches_tracked).
MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64)}


def _strategy(name: str):
    cfg = load_config({"overrides": f"dataset=synthetic strategy={name}"})
    return build_strategy(cfg, specs_of({k: torch.from_numpy(v) for k, v in MODEL.items()}), ())


def _example(container: type, seed: int) -> dict | list | ArrayRecord:
    """Arrays of several dtypes and shapes, keys deliberately not sorted."""
    rng = np.random.default_rng(seed)
    arrays = {
        "z.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "a.bias": rng.standard_normal(3),
        "n": np.array(rng.integers(9), dtype=np.int64),
    }
    if container is ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return list(arrays.values()) if container is list else arrays


def _plain(value: dict | list | ArrayRecord | None) -> list | None:
    if isinstance(value, ArrayRecord):
        value = {k: a.numpy() for k, a in value.items()}
    items = enumerate(value) if isinstance(value, list) else (value or {}).items()
    return None if value is None else [(k, v.dtype, v.shape, v.tobytes()) for k, v in items]


@pytest.mark.parametrize("name", list(INNER_STRATEGIES))
def test_strategy_state_round_trips_through_the_checkpoint(tmp_path: Path, name: str) -> None:
    saved = _strategy(name)
    attributes = state_attributes(saved)
    *filled, left_none = list(attributes) or [None]
    for seed, attribute in enumerate(filled):
        setattr(saved.inner, attribute, _example(attributes[attribute], seed))
    # Every strategy, stateless or not, also resumes the server's moving average.
    average = {"w": MODEL["w"] * 0.25 + 1, "n": np.array(3, dtype=np.int64)}
    saved.moving_average.average = {k: v.copy() for k, v in average.items()}
    saved.moving_average.num_updates = 5

    save_checkpoint(tmp_path, 2, MODEL, saved)
    checkpoint = load_checkpoint(tmp_path)
    resumed = _strategy(name)
    for attribute in filled:  # a fresh strategy holds something else, or nothing
        assert _plain(getattr(resumed.inner, attribute)) != _plain(getattr(saved.inner, attribute))
    assert resumed.moving_average.average is None and resumed.lineage != saved.lineage
    restore(checkpoint, resumed, list(MODEL))

    assert checkpoint.round == 2
    assert sorted(_plain(checkpoint.model)) == sorted(_plain(MODEL))  # values, dtypes, shapes
    assert {k: v.shape for k, v in checkpoint.model.items()} == {"w": (2, 3), "n": ()}
    assert list(resumed.moving_average.average) == list(MODEL)  # the model's tensor order
    assert sorted(_plain(resumed.moving_average.average)) == sorted(_plain(average))
    assert resumed.moving_average.num_updates == 5
    assert resumed.lineage == saved.lineage
    for attribute in attributes:
        before, after = getattr(saved.inner, attribute), getattr(resumed.inner, attribute)
        assert type(after) is type(before), attribute
        assert _plain(after) == _plain(before), attribute
    if left_none is not None:
        assert getattr(resumed.inner, left_none) is None
        assert checkpoint.strategy_none == (left_none,)
    else:  # a stateless strategy: nothing of it is saved, and restoring changes none of it
        assert checkpoint.strategy == {} and checkpoint.strategy_none == ()
        assert checkpoint.strategy_class == type(saved.inner).__name__


def test_checkpoint_of_another_strategy_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, MODEL, _strategy("fedadam"))
    with pytest.raises(ValueError, match="written by FedAdam, not FedAvgM"):
        restore(load_checkpoint(tmp_path), _strategy("fedavgm"), list(MODEL))


def test_checkpoint_without_strategy_state_is_refused_for_a_stateful_strategy(
    tmp_path: Path,
) -> None:
    save_checkpoint(tmp_path, 1, MODEL, _strategy("fedyogi"))
    older = dataclasses.replace(load_checkpoint(tmp_path), strategy_class=None, strategy_none=())
    with pytest.raises(ValueError, match=r"lacks the FedYogi state \['current_arrays', 'm_t'"):
        restore(older, _strategy("fedyogi"), list(MODEL))
    restore(older, _strategy("fedavg"), list(MODEL))  # stateless: nothing is missing


# ----------------------------------------------------------------------------- client state
def _state(value: float) -> RecordDict:
    """Optimizer state as ``save_optimizer_state`` stores it (here: one float tensor)."""
    arrays, formats = encode_tensors({"0.exp_avg": torch.full((3,), value)}, FP32)
    return RecordDict({STATE_KEY: arrays, STATE_KEY + FORMAT_SUFFIX: formats})


def _rounds(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_client_state_file_round_trips_exactly(tmp_path: Path) -> None:
    state = _state(1.5)
    write_round_state(tmp_path, 3, state)
    loaded = read_round_state(tmp_path, 4)
    for key in (STATE_KEY, STATE_KEY + FORMAT_SUFFIX):
        assert list(loaded[key].items()) == list(state[key].items())  # order too
    assert _rounds(tmp_path) == ["round-3.safetensors"]  # atomic: no .tmp left


def test_client_reads_the_newest_state_before_the_round(tmp_path: Path) -> None:
    assert read_round_state(tmp_path / "missing", 5) is None
    for server_round in (1, 3):
        write_round_state(tmp_path, server_round, _state(server_round))
    assert read_round_state(tmp_path, 1) is None
    assert read_round_state(tmp_path, 3) == _state(1)  # round 3's own file is ignored
    assert read_round_state(tmp_path, 9) == _state(3)


def test_client_keeps_the_round_and_the_newest_earlier_one(tmp_path: Path) -> None:
    for server_round in (1, 2, 5, 6):
        write_round_state(tmp_path, server_round, _state(server_round))
    assert _rounds(tmp_path) == ["round-5.safetensors", "round-6.safetensors"]
    (tmp_path / "round-2.safetensors.tmp").write_bytes(b"torn")  # a crashed write
    # The server resumed after round 3: round 5 and 6 are stale, round 4 is rewritten.
    write_round_state(tmp_path, 4, _state(4.5))
    assert _rounds(tmp_path) == ["round-4.safetensors"]  # no earlier file was left
    write_round_state(tmp_path, 5, _state(5.5))
    write_round_state(tmp_path, 5, _state(5.25))  # a retried round replaces its file
    assert _rounds(tmp_path) == ["round-4.safetensors", "round-5.safetensors"]
    assert read_round_state(tmp_path, 6) == _state(5.25)


@pytest.mark.parametrize(
    ("node_config", "run_config", "expected"),
    [
        ({}, {}, None),
        ({}, {"output-dir": "/runs/a"}, "/runs/a/client-state/partition-2"),
        ({}, {"output-dir": "/runs/a", "train.state_dir": "/s"}, "/s/partition-2"),
        ({"state-dir": "/n"}, {"output-dir": "/runs/a", "train.state_dir": "/s"}, "/n/partition-2"),
    ],
)
def test_state_directory_node_config_wins(node_config, run_config, expected) -> None:
    cfg = load_config({"overrides": "dataset=synthetic", **run_config})
    directory = state_directory(cfg, node_config, "partition-2")
    assert directory == (None if expected is None else Path(expected))
    lineage = "ab12" * 8  # the server's uuid4().hex form
    assert state_directory(cfg, node_config, "partition-2", lineage=lineage) == (
        None if expected is None else Path(expected).parent / lineage / "partition-2"
    )


def test_a_fresh_run_ignores_client_state_left_in_its_folder_by_another_run(
    tmp_path: Path,
) -> None:
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    _run(reused, extra="seed=1", keep_optimizer_state=True)  # leaves client-state behind
    _run(reused, keep_optimizer_state=True)
    _run(fresh, keep_optimizer_state=True)
    a = load_file(str(reused / "model.safetensors"))
    b = load_file(str(fresh / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert len(list((reused / DEFAULT_STATE_SUBDIR).iterdir())) == 2  # one folder per lineage
