"""Per-round server checkpoints: model, moving average, strategy state, round and Python RNG.

One ``checkpoint.safetensors`` holds the tensors (``model/``, ``average/`` and the inner
strategy's state under ``strategy/``) and, as string metadata, the round counter, the moving
average's update count, Python's ``random`` state (client sampling is seeded per round, see
``strategies/node_order.py``; any other user of ``random`` resumes where it was) and the
inner strategy's class, tensor order and None attributes. No pickle. It is written to a
temporary file and renamed, so a crash never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from strategies import LowPrecisionStrategy
from strategies.state import (
    SEPARATOR,
    inner_strategy,
    load_strategy_state,
    none_attributes,
    state_attributes,
    strategy_state,
)

CHECKPOINT_NAME = "checkpoint.safetensors"
_MODEL, _AVERAGE, _STRATEGY = "model/", "average/", "strategy/"


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run needs: the broadcast model after ``round`` and the server state.

    ``strategy_class`` is None for checkpoints written before strategy state was saved.
    """

    round: int
    model: dict[str, np.ndarray]
    average: dict[str, np.ndarray] | None
    num_updates: int
    random_state: tuple
    strategy_class: str | None = None
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_none: tuple[str, ...] = ()
    lineage: str = ""


def _tensors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return {prefix + k: torch.from_numpy(np.asarray(v, order="C")) for k, v in arrays.items()}


def save_checkpoint(
    directory: Path,
    server_round: int,
    model: dict[str, np.ndarray],
    strategy: LowPrecisionStrategy,
) -> Path:
    """Atomically write the state after ``server_round``; returns the checkpoint's path."""
    moving_average = strategy.moving_average
    inner_state = strategy_state(strategy)
    tensors = _tensors(_MODEL, model)
    if moving_average.average is not None:
        tensors.update(_tensors(_AVERAGE, moving_average.average))
    tensors.update(_tensors(_STRATEGY, inner_state))
    metadata = {
        "round": str(server_round),
        "lineage": strategy.lineage,
        "num_updates": str(moving_average.num_updates),
        "random_state": json.dumps(random.getstate()),
        "strategy": json.dumps(
            {
                "class": type(inner_strategy(strategy)).__name__,
                "order": list(inner_state),
                "none": none_attributes(strategy),
            }
        ),
    }
    path = directory / CHECKPOINT_NAME
    tmp = directory / (CHECKPOINT_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _as_tuple(value: object) -> object:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model = {k[len(_MODEL) :]: v.numpy() for k, v in tensors.items() if k.startswith(_MODEL)}
    average = {k[len(_AVERAGE) :]: v.numpy() for k, v in tensors.items() if k.startswith(_AVERAGE)}
    strategy = json.loads(metadata.get("strategy", "null")) or {}
    return Checkpoint(
        round=int(metadata["round"]),
        model=model,
        average=average or None,
        num_updates=int(metadata["num_updates"]),
        random_state=_as_tuple(json.loads(metadata["random_state"])),
        strategy_class=strategy.get("class"),
        strategy={k: tensors[_STRATEGY + k].numpy() for k in strategy.get("order", [])},
        strategy_none=tuple(strategy.get("none", ())),
        lineage=metadata.get("lineage", ""),
    )


def restore(checkpoint: Checkpoint, strategy: LowPrecisionStrategy, names: list[str]) -> None:
    """Put the moving average, the inner strategy's state and the client-sampling RNG back.

    ``names`` is the model's tensor order: the broadcast draws one dither key per tensor in
    order, so a resumed run must iterate tensors exactly like an uninterrupted one.
    """
    _check_strategy(checkpoint, strategy)
    average = checkpoint.average
    if average is not None:
        average = {name: average[name] for name in names}
    strategy.moving_average.average = average
    strategy.moving_average.num_updates = checkpoint.num_updates
    load_strategy_state(strategy, checkpoint.strategy)
    if checkpoint.lineage:  # clients find the optimizer state of this lineage again
        strategy.lineage = checkpoint.lineage
    random.setstate(checkpoint.random_state)


def _check_strategy(checkpoint: Checkpoint, strategy: LowPrecisionStrategy) -> None:
    """Refuse a checkpoint whose strategy state does not fit the configured strategy."""
    name = type(inner_strategy(strategy)).__name__
    if checkpoint.strategy_class not in (None, name):
        raise ValueError(
            f"{CHECKPOINT_NAME} was written by {checkpoint.strategy_class}, not {name}: "
            "resume with the same strategy as the run that wrote it"
        )
    saved = {k.partition(SEPARATOR)[0] for k in checkpoint.strategy}
    missing = sorted(set(state_attributes(strategy)) - saved - set(checkpoint.strategy_none))
    if missing:
        raise ValueError(
            f"{CHECKPOINT_NAME} lacks the {name} state {missing} (written by an older version?): "
            "it cannot resume this run exactly; start it again without server.resume"
        )
