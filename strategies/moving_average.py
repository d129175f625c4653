"""The server's float32 moving average of the global model (the paper's w_bar), as a wrapper."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from .wrapper import StrategyWrapper, nonnegative_int


def check_decay(decay: float) -> None:
    """Raise ``ValueError`` unless the moving-average decay lambda is in [0, 1) (0 = off)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the moving-average decay must be in [0, 1) (0 = off), got {decay}")


def check_start_round(start_round: int) -> None:
    """Raise ``ValueError`` unless the first averaged round is >= 1."""
    if start_round < 1:
        raise ValueError(f"the moving average's first round must be >= 1, got {start_round}")


class ServerMovingAverage(StrategyWrapper):
    """``w_bar_t = lam_t * w_bar_{t-1} + (1 - lam_t) * w_t``, started at ``start_round``.

    Wraps any strategy: each round's aggregate ``w_t`` is folded into the average, and the
    average is what the round returns, so it is what Flower evaluates and broadcasts next.
    ``decay`` is the paper's lambda (0 turns the average off: the wrapper then changes
    nothing). With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` after n updates,
    as TensorFlow's ExponentialMovingAverage does with ``num_updates``: early models then fade
    fast instead of dominating for tens of rounds. Only floating-point arrays are averaged;
    integer buffers (BatchNorm's batch count) take the newest value.
    """

    def __init__(
        self,
        strategy: Strategy,
        decay: float = 0.9,
        start_round: int = 1,
        warmup: bool = False,
    ) -> None:
        super().__init__(strategy)
        check_decay(decay)
        check_start_round(start_round)
        self.decay = decay
        self.start_round = start_round
        self.warmup = warmup
        #: The float32 average (None until the first folded round), in the model's order.
        self.average: dict[str, np.ndarray] | None = None
        self.num_updates = 0

    @property
    def enabled(self) -> bool:
        """Whether averaging happens at all (decay > 0)."""
        return self.decay > 0.0

    def summary(self) -> None:
        """Log the averaging settings, then the wrapped strategy's."""
        log(
            INFO,
            "\t├──> Server moving average: lambda %.3f from round %d%s",
            self.decay,
            self.start_round,
            " with warm-up" if self.warmup else "",
        )
        super().summary()

    def decay_at(self, num_updates: int) -> float:
        """The lambda applied at the update that follows ``num_updates`` earlier ones."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped aggregate folded into the average; returns the average."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        model = {name: arrays[name].numpy() for name in arrays}
        average = self.update(server_round, model)
        return ArrayRecord(
            {k: Array(np.asarray(v, order="C")) for k, v in average.items()}
        ), metrics

    def update(self, server_round: int, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fold this round's aggregate into the average; returns the model to broadcast."""
        if not self.enabled or server_round < self.start_round:
            return dict(model)
        if self.average is None:
            self.average = {k: np.array(v, copy=True) for k, v in model.items()}
            self.num_updates = 1
            return dict(self.average)
        lam = np.float32(self.decay_at(self.num_updates))
        for name, value in model.items():
            current = self.average[name]
            if np.issubdtype(current.dtype, np.floating):
                self.average[name] = (lam * current + (np.float32(1) - lam) * value).astype(
                    current.dtype, copy=False
                )
            else:
                self.average[name] = np.array(value, copy=True)
        self.num_updates += 1
        return dict(self.average)

    def state_dict(self) -> dict[str, Any]:
        """``{"average": arrays or None, "num_updates": n, "strategy": ...}``."""
        average = None if self.average is None else dict(self.average)
        return {"average": average, "num_updates": self.num_updates, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average and its update count (the arrays keep their given order)."""
        average = state.get("average")
        num_updates = nonnegative_int(state.get("num_updates"), "the moving average's num_updates")
        if average is not None and not isinstance(average, Mapping):
            raise ValueError("the moving average must be a mapping of arrays or None")
        super().load_state_dict(state)
        self.average = None if average is None else {k: np.asarray(v) for k, v in average.items()}
        self.num_updates = num_updates
