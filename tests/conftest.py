"""Shared fixtures, and the Hypothesis profiles of the property tests."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from scripts.task_identity import task_identity

# Hypothesis profiles (tests/test_hostile_fuzz.py). "default": fast and deterministic, for every
# run; "fuzz": a long randomized search, opt-in with `HYPOTHESIS_PROFILE=fuzz pytest -m fuzz`.
# Neither keeps an example database (no .hypothesis/ folder): a failure prints its shrunk
# example, and the fuzz profile also a @reproduce_failure blob and which lines explain it.
settings.register_profile(
    "default",
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=2000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Messages can be built outside a Flower runtime; Flower's node sampling is seeded."""
    random.seed(0)  # Flower samples nodes with `random`
    torch.manual_seed(0)
    with task_identity():
        yield


@pytest.fixture
def int8_products_allowed(monkeypatch):
    """Lift the gate that keeps layers in float32 on CPUs without int8 dot-product instructions
    (``integer_ops.int8_products_problem``): ``torch._int_mm`` is exact there, only slow, and
    tests using this check numbers, not speed."""
    monkeypatch.setattr("quantization.integer_ops.int8_products_problem", lambda: None)
