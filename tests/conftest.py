"""Shared fixtures."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from tests.flower_harness import task_identity


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Messages can be built outside a Flower runtime; Flower's node sampling is seeded."""
    random.seed(0)  # Flower samples nodes with `random`
    torch.manual_seed(0)
    with task_identity():
        yield
