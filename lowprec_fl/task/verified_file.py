"""safetensors files with an integrity digest, written atomically.

safetensors checks its header, not its data: a flipped bit in a tensor loads silently. Each
file written here carries, in its metadata, ``sha256`` over every tensor (name, dtype, shape
and bytes, in name order) and every other metadata entry; ``load_verified`` recomputes it and
refuses a file that does not match, naming the file. Files are written to ``<name>.tmp``,
flushed to disk and renamed, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

DIGEST_KEY = "sha256"


class CorruptFileError(ValueError):
    """A state or checkpoint file that cannot be trusted; the message names it and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """sha256 over the tensors (by name) and the metadata (by key), excluding any digest."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # keeps 0-d arrays 0-d
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        h.update(array.tobytes())
    h.update(json.dumps({k: v for k, v in sorted(metadata.items()) if k != DIGEST_KEY}).encode())
    return h.hexdigest()


def save_verified(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> Path:
    """Write ``tensors`` and ``metadata`` plus their digest to ``path`` atomically."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}  # 0-d stays 0-d
    meta = dict(metadata)
    meta[DIGEST_KEY] = digest(arrays, meta)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_verified(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a file ``save_verified`` wrote; ``CorruptFileError`` otherwise."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors and numpy raise many kinds for a damaged file
        raise CorruptFileError(
            path, f"not a readable safetensors file ({type(err).__name__}: {err})"
        ) from None
    odd = [n for n, t in tensors.items() if t.dtype.kind not in "biuf" or t.dtype.hasobject]
    if odd:
        raise CorruptFileError(path, f"holds tensors of unsupported dtypes: {odd[:3]}")
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        raise CorruptFileError(path, "has no integrity digest (not written by this project?)")
    if digest(tensors, metadata) != expected:
        raise CorruptFileError(path, "its contents do not match its digest (damaged on disk?)")
    return tensors, metadata
