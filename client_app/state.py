"""Client-side optimizer state kept between rounds, in quantized form.

Within a run it lives in ``context.state``. A resumed run is a new Flower run whose contexts
start empty, so with a state directory the client also writes it after every round to
``<state dir>/partition-<id>/round-<t>.safetensors`` (the same encoded arrays, their formats as
JSON metadata; no pickle) and reads the newest file of an earlier round before training.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.numpy import save_file

from quantization import FP32, LowPrecisionOptimizer
from quantization.wire import FORMAT_SUFFIX, encode_tensors, read_tensors

STATE_KEY = "optimizer-state"
#: ``--node-config`` key that sets this SuperNode's state directory (wins over the run config).
STATE_DIR_NODE_KEY = "state-dir"
#: The state directory under ``output_dir`` when neither the node nor ``train.state_dir`` sets one.
DEFAULT_STATE_SUBDIR = "client-state"
_ROUND_FILE = re.compile(r"round-(\d+)\.safetensors")


def save_optimizer_state(state: RecordDict, optimizer: LowPrecisionOptimizer) -> int:
    """Store the optimizer's state (BFP codes + exponents); returns its payload bytes."""
    arrays, formats = encode_tensors(optimizer.export_state(), FP32)
    state[STATE_KEY] = arrays
    state[STATE_KEY + FORMAT_SUFFIX] = formats
    return arrays.count_bytes()


def load_optimizer_state(state: RecordDict, optimizer: LowPrecisionOptimizer) -> bool:
    """Restore state saved by ``save_optimizer_state``; False if there is none."""
    if STATE_KEY not in state.array_records:
        return False
    tensors = read_tensors(
        state.array_records[STATE_KEY], state.config_records[STATE_KEY + FORMAT_SUFFIX]
    )
    optimizer.import_state(tensors)
    return True


def state_directory(
    cfg: DictConfig, node_config: Mapping[str, Any], partition_id: int, lineage: str = ""
) -> Path | None:
    """This client's state-file folder, or None to keep the state only in ``context.state``.

    The root is ``--node-config state-dir=...`` if set, else ``train.state_dir``, else
    ``<output_dir>/client-state`` when ``output_dir`` is set. Below it, ``<lineage>/`` (the id
    the server sends, shared by a run and its resumptions) keeps a fresh run that reuses the
    folder from picking up the state of an earlier, unrelated run.
    """
    root = str(node_config.get(STATE_DIR_NODE_KEY) or cfg.train.state_dir)
    if not root and cfg.output_dir:
        root = str(Path(cfg.output_dir) / DEFAULT_STATE_SUBDIR)
    if not root:
        return None
    return Path(root, lineage, f"partition-{partition_id}")


def _round_files(directory: Path) -> dict[int, Path]:
    files = {}
    for path in directory.glob("round-*.safetensors"):
        match = _ROUND_FILE.fullmatch(path.name)
        if match:
            files[int(match.group(1))] = path
    return files


def write_round_state(directory: Path, server_round: int, state: RecordDict) -> Path:
    """Atomically write the state saved after ``server_round``; prune the other files.

    Files of later rounds (left by a crashed attempt) go, and of the earlier ones only the
    newest stays: a server resumes at most one round behind its clients.
    """
    arrays = state.array_records[STATE_KEY]
    formats = state.config_records[STATE_KEY + FORMAT_SUFFIX]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"order": json.dumps(list(arrays)), "formats": json.dumps(dict(formats.items()))}
    save_file({key: array.numpy() for key, array in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    files = _round_files(directory)
    keep = {server_round, max((r for r in files if r < server_round), default=server_round)}
    for old in [p for r, p in files.items() if r not in keep] + list(directory.glob("*.tmp")):
        old.unlink(missing_ok=True)
    return path


def read_round_state(directory: Path, server_round: int) -> RecordDict | None:
    """The state written after the newest round before ``server_round``; None if there is none."""
    earlier = [r for r in _round_files(directory) if r < server_round]
    if not earlier:
        return None
    path = directory / f"round-{max(earlier)}.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        arrays = {key: Array(f.get_tensor(key)) for key in json.loads(metadata["order"])}
    return RecordDict(
        {
            STATE_KEY: ArrayRecord(arrays),
            STATE_KEY + FORMAT_SUFFIX: ConfigRecord(json.loads(metadata["formats"])),
        }
    )
