"""Reproducible client sampling: present nodes to Flower's sampler in partition order.

Flower samples clients with ``random.sample(list(grid.get_node_ids()), k)``; node ids are random
per simulation (and per deployment), so a seeded ``random`` still picks different partitions
from run to run. Each node is asked once for its ``partition-id`` (a ``query`` message); the
sampler then sees the nodes sorted by partition, and the same seed picks the same clients.

The global ``random`` is not enough either: Flower's heartbeat and retry code draw from it at
moments that depend on timing (a cold start draws more), so ``seeded_sampling`` runs the
sampler on a private generator seeded per round.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import strategy_utils

from lowprec_fl.protocol import CONFIG_KEY, METRICS_KEY, PARTITION_KEY


class PartitionOrder:
    """Remembers each node's partition id and orders node ids by it."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.partitions: dict[int, int] = {}
        self.asked: set[int] = set()
        self.timeout = timeout

    def learn(self, grid: Grid) -> None:
        """Ask each new node once for its partition id (nodes that don't answer sort last)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.asked]
        if not unknown:
            return
        self.asked.update(unknown)
        content = RecordDict({CONFIG_KEY: ConfigRecord({"query": PARTITION_KEY})})
        messages = [
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
            for node in unknown
        ]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
            value = metrics.get(PARTITION_KEY) if metrics is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                self.partitions[node] = value
            else:
                log(WARNING, "Node %d did not report its partition id", node)

    def sorted(self, node_ids: Iterable[int]) -> list[int]:
        """Node ids by partition id; unknown nodes last, by id."""
        return sorted(
            node_ids, key=lambda n: (n not in self.partitions, self.partitions.get(n, 0), n)
        )

    def ordered(self, grid: Grid) -> Grid:
        """``grid`` whose ``get_node_ids()`` lists nodes in partition order."""
        self.learn(grid)
        return _OrderedGrid(grid, self)


class _OrderedGrid:
    """Delegates to a Grid; only ``get_node_ids`` is reordered."""

    def __init__(self, grid: Grid, order: PartitionOrder) -> None:
        self._grid = grid
        self._order = order

    def get_node_ids(self) -> list[int]:
        """Node ids in partition order."""
        return self._order.sorted(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


_SAMPLING_LOCK = threading.Lock()  # one patched sampler at a time, restored in order


@contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Make Flower's strategies sample nodes with ``random.Random(seed)`` inside the block."""
    with _SAMPLING_LOCK:
        shared = strategy_utils.random  # the module Flower's sample_nodes draws from
        strategy_utils.random = random.Random(seed)
        try:
            yield
        finally:
            strategy_utils.random = shared
