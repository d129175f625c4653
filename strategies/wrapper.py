"""The base of this package's strategy wrappers: one job around any Flower strategy.

Like Flower's ``DifferentialPrivacyClientSideFixedClipping``, a wrapper keeps the strategy it
wraps in ``self.strategy`` and delegates what it does not change. Unlike Flower's, every
wrapper also has a between-round state, as a tree: ``state_dict()`` returns the wrapper's own
entries plus ``"strategy"``, the state of what it wraps (a Flower strategy contributes its
stateful attributes, see ``strategies.state``), and ``load_state_dict`` puts a tree back. A
checkpoint saves the outermost wrapper's tree; nothing sets attributes from outside.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .state import flower_state, load_flower_state

#: The state tree's key for the wrapped strategy's state.
WRAPPED = "strategy"

W = TypeVar("W", bound=Strategy)


class StrategyWrapper(Strategy):
    """Delegates every call to ``strategy``; subclasses change the calls their job needs."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def summary(self) -> None:
        """Log the wrapped strategy's settings (subclasses log their own line first)."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's evaluation metrics."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        """This wrapper's between-round state and, under ``"strategy"``, the wrapped one's."""
        return {WRAPPED: state_dict_of(self.strategy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a tree from ``state_dict``; raises ``ValueError`` naming a bad entry."""
        if WRAPPED not in state:
            raise ValueError(f"the {type(self).__name__} state has no {WRAPPED!r} entry")
        load_state_dict_of(self.strategy, state[WRAPPED])


def state_dict_of(strategy: Strategy) -> dict[str, Any]:
    """The state tree of a wrapper, or a Flower strategy's stateful attributes."""
    if isinstance(strategy, StrategyWrapper):
        return strategy.state_dict()
    return flower_state(strategy)


def load_state_dict_of(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what ``state_dict_of`` returned."""
    if isinstance(strategy, StrategyWrapper):
        strategy.load_state_dict(state)
    else:
        load_flower_state(strategy, state)


def nonnegative_int(value: object, name: str) -> int:
    """``value`` if it is an integer >= 0 (not a bool); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def find_wrapper(strategy: Strategy, kind: type[W]) -> W | None:
    """The outermost ``kind`` in a chain of wrappers (ours or Flower's), or None."""
    while strategy is not None:
        if isinstance(strategy, kind):
            return strategy
        strategy = getattr(strategy, "strategy", None)
    return None
