"""Helpers several test files use: the real-MNIST data root, and editing Flower records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def mnist_root() -> str:
    """DATA_ROOT when it holds real MNIST; otherwise skip the calling test with the reason."""
    root = os.environ.get("DATA_ROOT")
    if not root:
        pytest.skip("DATA_ROOT is not set; point it at a folder holding MNIST/raw (../shared/data)")
    if not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"DATA_ROOT={root!r} holds no MNIST/raw/train-images-idx3-ubyte")
    return root


def with_item(record, key: str, value):
    """A copy of a Flower record with ``key`` set to ``value`` (removed when ``value`` is None)."""
    items = dict(record.items())
    if value is None:
        del items[key]
    else:
        items[key] = value
    return type(record)(items)
