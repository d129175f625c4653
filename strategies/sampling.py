"""Reproducible client sampling without a message to any node.

Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)``. Node ids are
random per simulation and per deployment, and the global ``random`` is drawn from by Flower's
heartbeat and retry code at moments that depend on timing, so the same seed picks different
clients from run to run. ``ReproducibleSampling`` instead ranks the nodes by what the
SuperLink already knows about them: ``grid.get_nodes()`` (one call to the SuperLink, no
message to any node) gives each node's registration time. The nodes' registration order is
their identity: in Flower's simulation nodes register in partition order (partition i is the
i-th node), and in a deployment the SuperLink keeps the time a node first registered.

Each round, node ``r`` (its registration rank) scores ``blake2b(seed, round, phase, r)``; the
inner strategy's sampler is made to take the ``k`` best-scoring nodes (rendezvous, or
"highest random weight", sampling). So:

* the same seed and the same federation sample the same clients, in simulation across runs
  and resumptions, whatever the node ids and whatever else draws from ``random``;
* the cost is one SuperLink call and a hash per connected node, nothing per node round trip;
* a node that joins (registering last) changes a round's sample only where it scores among
  the best ``k``; a node that leaves frees its slot for the next-best node (nodes registered
  after it move up one rank, so their scores change).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy, strategy_utils

from .wrapper import StrategyWrapper

_PHASES = {"train": 0, "evaluate": 1}


class ReproducibleSampling(StrategyWrapper):
    """Makes the wrapped strategy's client sample a function of the seed and the round."""

    def __init__(self, strategy: Strategy, seed: int = 0) -> None:
        super().__init__(strategy)
        self.seed = int(seed)

    def summary(self) -> None:
        """Log the sampling seed, then the wrapped strategy's settings."""
        log(INFO, "\t├──> Reproducible client sampling: seed %d", self.seed)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages, to the round's best-scoring nodes."""
        with top_k_sampling():
            ranked = _RankedGrid(grid, self.seed, server_round, "train")
            return list(self.strategy.configure_train(server_round, arrays, config, ranked))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages, to the round's best-scoring nodes."""
        with top_k_sampling():
            ranked = _RankedGrid(grid, self.seed, server_round, "evaluate")
            return list(self.strategy.configure_evaluate(server_round, arrays, config, ranked))


def registration_order(grid: Grid) -> list[int]:
    """Connected node ids by registration time (then id): partition order in simulation.

    A grid that does not describe its nodes (not a ``flwr.serverapp.Grid``) gives id order.
    """
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return sorted(grid.get_node_ids())
    nodes = list(get_nodes())
    return [n.node_id for n in sorted(nodes, key=lambda n: (n.registered_at, n.node_id))]


def ranked_nodes(node_ids: Sequence[int], seed: int, server_round: int, phase: str) -> list[int]:
    """``node_ids`` (in registration order) from the best score to the worst for this round."""
    prefix = f"{seed}/{server_round}/{_PHASES[phase]}/".encode()

    def score(rank: int) -> bytes:
        return hashlib.blake2b(prefix + str(rank).encode(), digest_size=8).digest()

    order = sorted(range(len(node_ids)), key=score)
    return [node_ids[i] for i in order]


class _RankedGrid:
    """Delegates to a Grid; ``get_node_ids`` lists the nodes from the best score down."""

    def __init__(self, grid: Grid, seed: int, server_round: int, phase: str) -> None:
        self._grid = grid
        self._key = (seed, server_round, phase)

    def get_node_ids(self) -> list[int]:
        """The connected nodes, best-scoring first (asked anew: nodes come and go)."""
        return ranked_nodes(registration_order(self._grid), *self._key)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


class _TopK(random.Random):
    """A ``random`` whose ``sample`` takes the first k: the population is already ranked."""

    def sample(self, population: Sequence, k: int, *, counts: object = None) -> list:  # type: ignore[override]
        """The first ``k`` of ``population``."""
        if counts is not None or not 0 <= k <= len(population):
            raise ValueError(f"cannot take {k} of {len(population)} ranked nodes")
        return list(population[:k])


_SAMPLING_LOCK = threading.Lock()  # one patched sampler at a time, restored in order


@contextmanager
def top_k_sampling() -> Iterator[None]:
    """Inside the block, Flower's ``sample_nodes`` takes the first nodes the grid lists."""
    with _SAMPLING_LOCK:
        shared = strategy_utils.random  # the module Flower's sample_nodes draws from
        strategy_utils.random = _TopK(0)
        try:
            yield
        finally:
            strategy_utils.random = shared
