"""Per-round server checkpoints: model, moving average, strategy state, round and Python RNG.

One ``checkpoint.safetensors`` holds the broadcast model and the strategy's state tree
(``LowPrecisionStrategy.state_dict()``): tensors ``model/``, ``average/`` (the moving average)
and ``strategy/`` (the Flower strategy's state) and, as string metadata, the round counter,
the lineage, the moving average's update count, the count of rounds in a row without an
accepted update, Python's ``random`` state (client sampling does not draw from it, see
``strategies/sampling.py``; any other user of ``random`` resumes where it was) and the Flower
strategy's class, tensor order and None attributes. No pickle. It is written to a
temporary file and renamed, so a crash never leaves a torn checkpoint, and it carries a sha256
digest of everything in it (``lowprec_fl.task.verified_file``): a damaged checkpoint is
refused with a message naming the file, never loaded into a run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowprec_fl.protocol import LINEAGE_PATTERN
from lowprec_fl.task.verified_file import CorruptFileError, load_verified, save_verified
from lowprec_fl.wire import TensorSpec
from strategies import LowPrecisionStrategy
from strategies.state import SEPARATOR
from strategies.wrapper import WRAPPED, nonnegative_int

CHECKPOINT_NAME = "checkpoint.safetensors"
_MODEL, _AVERAGE, _STRATEGY = "model/", "average/", "strategy/"


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run needs: the broadcast model after ``round`` and the server state."""

    round: int
    model: dict[str, np.ndarray]
    average: dict[str, np.ndarray] | None
    num_updates: int
    random_state: tuple
    strategy_class: str | None = None
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_none: tuple[str, ...] = ()
    lineage: str = ""
    failed_rounds: int = 0


class CheckpointError(ValueError):
    """A checkpoint that cannot resume this run; the message names the file and the problem."""


def _tensors(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return {prefix + k: np.asarray(v, order="C") for k, v in arrays.items()}


def save_checkpoint(
    directory: Path,
    server_round: int,
    model: dict[str, np.ndarray],
    strategy: LowPrecisionStrategy,
) -> Path:
    """Atomically write the state after ``server_round``; returns the checkpoint's path.

    The strategy's state tree (``strategy.state_dict()``) is written entry by entry: the
    moving average under ``average/``, the Flower strategy's arrays under ``strategy/``,
    counters and names as metadata.
    """
    state = _flatten(strategy.state_dict())
    inner_state = state["arrays"]
    tensors = _tensors(_MODEL, model)
    if state["average"] is not None:
        tensors.update(_tensors(_AVERAGE, state["average"]))
    tensors.update(_tensors(_STRATEGY, inner_state))
    metadata = {
        "round": str(server_round),
        "lineage": state["lineage"],
        "num_updates": str(state["num_updates"]),
        "failed_rounds": str(state["failed_rounds"]),
        "random_state": json.dumps(random.getstate()),
        "strategy": json.dumps(
            {
                "class": state["class"],
                "order": list(inner_state),
                "none": state["none"],
                "dtypes": {key: value.dtype.str for key, value in inner_state.items()},
            }
        ),
    }
    return save_verified(directory / CHECKPOINT_NAME, tensors, metadata)


def _chain(tree: dict) -> list[dict]:
    """The nodes of a state tree, outermost first (each wrapper's state holds the next)."""
    nodes = [tree]
    while isinstance(nodes[-1].get(WRAPPED), dict):
        nodes.append(nodes[-1][WRAPPED])
    return nodes


def _flatten(tree: dict) -> dict:
    """Every wrapper's own entries in one mapping (their names do not collide)."""
    return {k: v for node in _chain(tree) for k, v in node.items() if k != WRAPPED}


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none.

    Raises ``CheckpointError`` naming the file when it is damaged or its metadata is not what
    ``save_checkpoint`` writes (a negative round, a negative update count, ...).
    """
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        tensors, metadata = load_verified(path)
        return _parse(tensors, metadata)
    except CorruptFileError as err:
        raise CheckpointError(f"cannot resume from {err}") from None
    except Exception as err:  # any failure to parse what the file says makes it unusable
        raise CheckpointError(
            f"cannot resume from {path}: its metadata is invalid ({type(err).__name__}: {err})"
        ) from None


def _nonnegative_int(metadata: Mapping[str, str], key: str) -> int:
    return nonnegative_int(json.loads(metadata[key]), repr(key))


def _parse(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Checkpoint:
    model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    average = {k[len(_AVERAGE) :]: v for k, v in tensors.items() if k.startswith(_AVERAGE)}
    stored = {k[len(_STRATEGY) :] for k in tensors if k.startswith(_STRATEGY)}
    unknown = [k for k in tensors if not k.startswith((_MODEL, _AVERAGE, _STRATEGY))]
    failed_rounds = (
        _nonnegative_int(metadata, "failed_rounds") if "failed_rounds" in metadata else 0
    )
    if unknown:
        raise ValueError(f"it holds tensors that are not part of a checkpoint: {unknown[:3]}")
    strategy = json.loads(metadata["strategy"])
    if not isinstance(strategy, dict) or set(strategy) != {"class", "order", "none", "dtypes"}:
        raise TypeError("'strategy' must be a JSON object with 'class', 'order', 'none', 'dtypes'")
    order, none, dtypes = strategy["order"], strategy["none"], strategy["dtypes"]
    if not isinstance(strategy["class"], str):
        raise TypeError("'strategy.class' must be a string")
    if not _strings(order) or sorted(order) != sorted(stored):
        raise ValueError("'strategy.order' must list exactly the strategy tensors")
    if not _strings(none):
        raise TypeError("'strategy.none' must be a list of strings")
    if not isinstance(dtypes, dict) or set(dtypes) != set(order):
        raise ValueError("'strategy.dtypes' must give the dtype of every strategy tensor")
    for key in order:
        if tensors[_STRATEGY + key].dtype.str != dtypes[key]:
            raise ValueError(f"strategy tensor {key!r} is not of its recorded dtype {dtypes[key]}")
    random_state = _random_state(json.loads(metadata["random_state"]))
    lineage = metadata["lineage"]
    if lineage and not LINEAGE_PATTERN.fullmatch(lineage):
        raise ValueError(f"'lineage' must be 32 hex digits, got {lineage[:40]!r}")
    return Checkpoint(
        round=_nonnegative_int(metadata, "round"),
        model=model,
        average=average or None,
        num_updates=_nonnegative_int(metadata, "num_updates"),
        random_state=random_state,
        strategy_class=strategy["class"],
        strategy={k: tensors[_STRATEGY + k] for k in order},
        strategy_none=tuple(none),
        lineage=lineage,
        failed_rounds=failed_rounds,
    )


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _random_state(value: object) -> tuple:
    """A state of Python's ``random`` (version, 625 32-bit words, gauss_next), checked."""
    if not (isinstance(value, list) and len(value) == 3):
        raise TypeError("'random_state' must be [version, words, gauss_next]")
    version, words, gauss_next = value
    if not (isinstance(words, list) and len(words) == 625):
        raise TypeError("'random_state' must hold 625 words")
    if not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2**32 for w in words):
        raise ValueError("'random_state' words must be integers in [0, 2**32)")
    if not (gauss_next is None or isinstance(gauss_next, float)):
        raise TypeError("'random_state' gauss_next must be null or a float")
    state = (version, tuple(words), gauss_next)
    random.Random().setstate(state)  # the version and the index (last word) are checked here
    return state


def check_fits(checkpoint: Checkpoint, template: Mapping[str, TensorSpec], path: Path) -> None:
    """Refuse a checkpoint whose model or average does not fit ``template`` or is not finite."""
    if set(checkpoint.model) != set(template):
        raise CheckpointError(
            f"{path} holds another model's tensors: resume with the same model and dataset "
            "settings as the run that wrote it"
        )
    parts = [("model", checkpoint.model)]
    if checkpoint.average is not None:
        if set(checkpoint.average) != set(template):
            raise CheckpointError(f"{path}: its moving average does not hold the model's tensors")
        parts.append(("moving average", checkpoint.average))
    for part, arrays in parts:
        for name, spec in template.items():
            value = arrays[name]
            want = torch.empty(0, dtype=spec.dtype).numpy().dtype
            if value.dtype != want:
                raise CheckpointError(
                    f"{path}: the {part}'s {name!r} is {value.dtype}, the model's is {want}"
                )
            if tuple(value.shape) != spec.shape:
                raise CheckpointError(
                    f"{path}: the {part}'s {name!r} has shape {tuple(value.shape)}, the model's "
                    f"has {spec.shape}: resume with the same model settings as the run that "
                    "wrote it"
                )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise CheckpointError(f"{path}: the {part}'s {name!r} holds NaN or inf")
    shapes = list(template.values())
    groups: dict[str, set[str]] = {}
    for flat in checkpoint.strategy:
        attribute, _, key = flat.partition(SEPARATOR)
        groups.setdefault(attribute, set()).add(key)
    by_name, by_index = set(template), {str(i) for i in range(len(template))}
    for attribute, keys in groups.items():
        if keys not in (by_name, by_index):
            covered = len(keys & (by_name | by_index))
            raise CheckpointError(
                f"{path}: the strategy state {attribute!r} covers {covered} of the model's "
                f"{len(template)} tensors"
            )
    for flat, value in checkpoint.strategy.items():
        _, _, key = flat.partition(SEPARATOR)
        spec = template.get(key) or (
            shapes[int(key)] if key.isdigit() and int(key) < len(shapes) else None
        )
        if spec is None or tuple(value.shape) != spec.shape:
            raise CheckpointError(
                f"{path}: the strategy state {flat!r} does not fit the model "
                f"(shape {tuple(value.shape)})"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{path}: the strategy state {flat!r} holds NaN or inf")


def restore(checkpoint: Checkpoint, strategy: LowPrecisionStrategy, names: list[str]) -> None:
    """Load the checkpoint's state tree into ``strategy``, and put the Python RNG back.

    ``names`` is the model's tensor order: the broadcast draws one dither key per tensor in
    order, so a resumed run must iterate tensors exactly like an uninterrupted one. Raises
    ``ValueError`` when the state does not fit the strategy (another Flower strategy, or a
    stateful one's state missing).
    """
    average = checkpoint.average
    values = {
        "round": checkpoint.round,
        "lineage": checkpoint.lineage,
        "average": None if average is None else {name: average[name] for name in names},
        "num_updates": checkpoint.num_updates,
        "failed_rounds": checkpoint.failed_rounds,
        "class": checkpoint.strategy_class,
        "arrays": checkpoint.strategy,
        "none": list(checkpoint.strategy_none),
    }
    tree = strategy.state_dict()  # the skeleton: which wrapper owns which entry
    for node in _chain(tree):
        node.update({k: values[k] for k in node if k in values})
    strategy.load_state_dict(tree)
    random.setstate(checkpoint.random_state)
