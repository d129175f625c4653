"""Build Flower Messages outside a Flower runtime (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def task_identity() -> Iterator[None]:
    """Set the task identity Flower's runtime gives an app process, so that ``Message(...)``
    can be built; restores the previous identity on exit."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
