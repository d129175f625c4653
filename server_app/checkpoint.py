"""Per-round server checkpoints: model, moving average, round and sampling RNG; pickle-free.

One ``checkpoint.safetensors`` holds the tensors and, as string metadata, the round counter,
the moving average's update count and Python's ``random`` state (Flower samples clients with
it). It is written to a temporary file and renamed, so a crash never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from strategies import ServerMovingAverage

CHECKPOINT_NAME = "checkpoint.safetensors"
_MODEL, _AVERAGE = "model/", "average/"


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run needs: the broadcast model after ``round`` and the server state."""

    round: int
    model: dict[str, np.ndarray]
    average: dict[str, np.ndarray] | None
    num_updates: int
    random_state: tuple


def save_checkpoint(
    directory: Path,
    server_round: int,
    model: dict[str, np.ndarray],
    moving_average: ServerMovingAverage,
) -> Path:
    """Atomically write the state after ``server_round``; returns the checkpoint's path."""
    tensors = {_MODEL + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.items()}
    if moving_average.average is not None:
        tensors.update(
            {
                _AVERAGE + k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in moving_average.average.items()
            }
        )
    metadata = {
        "round": str(server_round),
        "num_updates": str(moving_average.num_updates),
        "random_state": json.dumps(random.getstate()),
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
    return Checkpoint(
        round=int(metadata["round"]),
        model=model,
        average=average or None,
        num_updates=int(metadata["num_updates"]),
        random_state=_as_tuple(json.loads(metadata["random_state"])),
    )


def restore(checkpoint: Checkpoint, moving_average: ServerMovingAverage, names: list[str]) -> None:
    """Put the moving average and the client-sampling RNG back where the checkpoint left them.

    ``names`` is the model's tensor order: the broadcast draws one dither key per tensor in
    order, so a resumed run must iterate tensors exactly like an uninterrupted one.
    """
    average = checkpoint.average
    if average is not None:
        average = {name: average[name] for name in names}
    moving_average.average = average
    moving_average.num_updates = checkpoint.num_updates
    random.setstate(checkpoint.random_state)
