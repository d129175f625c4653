"""Client-side optimizer state kept between rounds, in quantized form.

Within a run it lives in ``context.state``. A resumed run is a new Flower run whose contexts
start empty, so with a state directory the client also writes it after every round to
``<state dir>/partition-<id>/round-<t>.safetensors`` (the same encoded arrays, their formats as
JSON metadata; no pickle) and reads the newest file of an earlier round before training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import log
from omegaconf import DictConfig

from lowprec_fl.protocol import LINEAGE_PATTERN
from lowprec_fl.task.verified_file import CorruptFileError, load_verified, save_verified
from lowprec_fl.wire import (
    FORMAT_SUFFIX,
    encode_tensors,
    read_tensors,
)
from quantization import FP32, LowPrecisionOptimizer

STATE_KEY = "optimizer-state"
#: ``--node-config`` key that sets this SuperNode's state directory (wins over the run config).
STATE_DIR_NODE_KEY = "state-dir"
#: The state directory under ``output_dir`` when neither the node nor ``train.state_dir`` sets one.
DEFAULT_STATE_SUBDIR = "client-state"
_ROUND_FILE = re.compile(r"round-(\d+)\.safetensors")


class StateDirectoryError(ValueError):
    """The server sent a lineage that is not a safe folder name."""


def save_optimizer_state(state: RecordDict, optimizer: LowPrecisionOptimizer) -> int:
    """Store the optimizer's state (BFP codes + exponents); returns its payload bytes."""
    arrays, formats = encode_tensors(optimizer.export_state(), FP32)
    state[STATE_KEY] = arrays
    state[STATE_KEY + FORMAT_SUFFIX] = formats
    return arrays.count_bytes()


def load_optimizer_state(
    state: RecordDict, optimizer: LowPrecisionOptimizer, source: str = "context.state"
) -> bool:
    """Restore state saved by ``save_optimizer_state``; False if there is none or it is unusable.

    State that does not fit the optimizer (another model, a damaged file) is logged, naming
    ``source``, and the optimizer starts afresh: one bad file must not knock a client out.
    """
    if STATE_KEY not in state.array_records:
        return False
    try:
        formats = state.config_records[STATE_KEY + FORMAT_SUFFIX]
        tensors = read_tensors(state.array_records[STATE_KEY], formats)
        optimizer.import_state(tensors)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        log(WARNING, "Ignoring the optimizer state in %s, starting it afresh: %s", source, err)
        return False
    return True


def state_directory(
    cfg: DictConfig, node_config: Mapping[str, Any], client: str, lineage: str = ""
) -> Path | None:
    """This client's state-file folder, or None to keep the state only in ``context.state``.

    The root is ``--node-config state-dir=...`` if set, else ``train.state_dir``, else
    ``<output_dir>/client-state`` when ``output_dir`` is set. Below it, ``<lineage>/`` (the id
    the server sends, shared by a run and its resumptions) keeps a fresh run that reuses the
    folder from picking up the state of an earlier, unrelated run; then ``<client>/``, this
    client's own folder (``ClientSite.name``: ``partition-<i>`` or ``node-<node id>``).
    """
    root = str(node_config.get(STATE_DIR_NODE_KEY) or cfg.train.state_dir)
    if not root and cfg.output_dir:
        root = str(Path(cfg.output_dir) / DEFAULT_STATE_SUBDIR)
    if not root:
        return None
    if lineage and not LINEAGE_PATTERN.fullmatch(lineage):
        raise StateDirectoryError(
            f"the server sent the run lineage {lineage[:80]!r}, which is not 32 lowercase hex "
            "digits as this project's ServerApp generates: refusing to use it as a folder name"
        )
    return Path(root, lineage, client)


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
    metadata = {"order": json.dumps(list(arrays)), "formats": json.dumps(dict(formats.items()))}
    save_verified(path, {key: array.numpy() for key, array in arrays.items()}, metadata)
    files = _round_files(directory)
    keep = {server_round, max((r for r in files if r < server_round), default=server_round)}
    for old in [p for r, p in files.items() if r not in keep] + list(directory.glob("*.tmp")):
        old.unlink(missing_ok=True)
    return path


def read_round_state(directory: Path, server_round: int) -> RecordDict | None:
    """The state written after the newest round before ``server_round``.

    None if there is none, or if that file is damaged (logged with its path): the client then
    starts its optimizer state afresh, and its next round writes a good file again.
    """
    earlier = [r for r in _round_files(directory) if r < server_round]
    if not earlier:
        return None
    path = directory / f"round-{max(earlier)}.safetensors"
    try:
        return _read_state_file(path)
    except CorruptFileError as err:
        log(WARNING, "Ignoring a damaged optimizer-state file, starting afresh: %s", err)
        return None


def _read_state_file(path: Path) -> RecordDict:
    tensors, metadata = load_verified(path)
    try:
        order = json.loads(metadata["order"])
        formats = json.loads(metadata["formats"])
        if not isinstance(order, list) or sorted(order) != sorted(tensors):
            raise ValueError("its tensor order does not list its tensors")
        if not isinstance(formats, dict):
            raise ValueError("its formats are not a JSON object")
        record = RecordDict(
            {
                STATE_KEY: ArrayRecord({key: Array(tensors[key]) for key in order}),
                STATE_KEY + FORMAT_SUFFIX: ConfigRecord(formats),
            }
        )
        # checks that the formats describe exactly the tensors (and their exponents/scales)
        read_tensors(
            record.array_records[STATE_KEY], record.config_records[STATE_KEY + FORMAT_SUFFIX]
        )
    except Exception as err:  # anything the file says that does not parse makes it unusable
        raise CorruptFileError(
            path, f"holds no valid optimizer state ({type(err).__name__}: {err})"
        ) from None
    return record
