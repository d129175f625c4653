"""A run that can be resumed: its round numbering, its lineage, what each round returned."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from lowprec_fl.protocol import LINEAGE_KEY, LINEAGE_PATTERN

from .wrapper import StrategyWrapper, nonnegative_int

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class RoundMetrics:
    """What the wrapped strategy returned in one round (None: nothing)."""

    train: MetricRecord | None = None
    evaluate: MetricRecord | None = None


class ResumableRun(StrategyWrapper):
    """The outermost wrapper of a run: the one place that knows rounds done before this start.

    Flower's ``Strategy.start`` counts rounds from 1. A resumed run continues after
    ``rounds_done`` (restored by ``load_state_dict``): every call to the wrapped strategy, and
    ``evaluate_fn``, gets the run's absolute round. The run's ``lineage`` (a random name kept
    across resumptions) goes into every training config, so clients find their saved state
    again. ``history`` holds the metrics the wrapped strategy returned each round - Flower's
    ``Result``, while the run is still going - for an ``evaluate_fn`` that records rounds.
    """

    def __init__(self, strategy: Strategy, lineage: str | None = None) -> None:
        super().__init__(strategy)
        self.lineage = lineage or uuid.uuid4().hex
        if not LINEAGE_PATTERN.fullmatch(self.lineage):
            raise ValueError(f"a lineage is 32 hex digits, got {self.lineage!r}")
        #: Rounds finished before this run's ``start`` (0 unless resumed).
        self.rounds_done = 0
        #: The last round configured (absolute).
        self.current_round = 0
        self.history: dict[int, RoundMetrics] = {}

    def summary(self) -> None:
        """Log the lineage and the rounds already done, then the wrapped strategy's settings."""
        log(INFO, "\t├──> Run %s, %d round(s) done before", self.lineage, self.rounds_done)
        super().summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run rounds ``rounds_done + 1`` to ``num_rounds`` (the run's total).

        The returned ``Result`` is keyed by absolute round, as ``evaluate_fn`` is called.
        """
        offset = self.rounds_done
        if num_rounds < offset:
            raise ValueError(f"num_rounds={num_rounds} but {offset} rounds are already done")
        shifted = None if evaluate_fn is None else (lambda r, a: evaluate_fn(r + offset, a))
        result = super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds - offset,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=shifted,
        )
        for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp"):
            setattr(result, name, {r + offset: m for r, m in getattr(result, name).items()})
        result.evaluate_metrics_serverapp = {
            r + offset: m for r, m in result.evaluate_metrics_serverapp.items()
        }
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages for the absolute round, with the lineage."""
        self.current_round = server_round + self.rounds_done
        config = ConfigRecord({**config, LINEAGE_KEY: self.lineage})
        return self.strategy.configure_train(self.current_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped aggregate of the absolute round; its metrics go into ``history``."""
        server_round += self.rounds_done
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.history.setdefault(server_round, RoundMetrics()).train = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages for the absolute round."""
        return self.strategy.configure_evaluate(
            server_round + self.rounds_done, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped evaluation metrics of the absolute round, also kept in ``history``."""
        server_round += self.rounds_done
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self.history.setdefault(server_round, RoundMetrics()).evaluate = metrics
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """``{"round": last round configured, "lineage": ..., "strategy": ...}``."""
        return {"round": self.current_round, "lineage": self.lineage, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["round"]``, under the saved lineage."""
        done = nonnegative_int(state.get("round"), "the run's round")
        lineage = state.get("lineage")
        if lineage and not (isinstance(lineage, str) and LINEAGE_PATTERN.fullmatch(lineage)):
            raise ValueError(f"the run's lineage must be 32 hex digits, got {lineage!r}")
        super().load_state_dict(state)
        self.rounds_done = self.current_round = done
        if lineage:  # clients find the optimizer state of this lineage again
            self.lineage = lineage
