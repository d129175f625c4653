"""The inner Flower strategy's between-round state as named arrays, for server checkpoints.

FedAdam, FedYogi and FedAdagrad (``FedOpt``) keep the last broadcast model and their moments;
FedAvgM keeps its reference model and momentum. A resumed run must get them back to continue
exactly where the killed one stopped. Only the classes in ``STATE_ATTRIBUTES`` are known to
keep state; every other strategy (FedAvg, FedProx, FedMedian, ...) contributes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

#: Stateful Flower strategies (subclasses included): attribute -> the container Flower keeps.
STATE_ATTRIBUTES: dict[type[Strategy], dict[str, type]] = {
    FedOpt: {"current_arrays": dict, "m_t": dict, "v_t": dict},
    FedAvgM: {"current_arrays": ArrayRecord, "momentum_vector": list},
}
SEPARATOR = "/"


def inner_strategy(strategy: Strategy) -> Strategy:
    """The innermost strategy of a chain of wrappers (ours and Flower's keep ``.strategy``)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


def state_attributes(strategy: Strategy) -> dict[str, type]:
    """The inner strategy's stateful attributes and their container types; {} if it has none."""
    for cls in type(inner_strategy(strategy)).__mro__:
        if cls in STATE_ATTRIBUTES:
            return STATE_ATTRIBUTES[cls]
    return {}


def none_attributes(strategy: Strategy) -> list[str]:
    """The inner strategy's stateful attributes that are None (e.g. before its first round)."""
    inner = inner_strategy(strategy)
    return [name for name in state_attributes(inner) if getattr(inner, name) is None]


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The inner strategy's state as ``"<attribute>/<key>"`` arrays, in Flower's own order.

    A list's key is its index. None attributes contribute nothing (see ``none_attributes``).
    """
    inner = inner_strategy(strategy)
    arrays: dict[str, np.ndarray] = {}
    for name, container in state_attributes(inner).items():
        value = getattr(inner, name)
        if value is None:
            continue
        if not isinstance(value, container):
            raise TypeError(
                f"{type(inner).__name__}.{name} is a {type(value).__name__}, expected a "
                f"{container.__name__}: update STATE_ATTRIBUTES for this Flower version"
            )
        for key, array in _items(value):
            arrays[name + SEPARATOR + key] = np.asarray(array)
    return arrays


def load_strategy_state(strategy: Strategy, arrays: Mapping[str, np.ndarray]) -> None:
    """Set the inner strategy's state from ``strategy_state`` output; absent attributes -> None.

    ``arrays`` must be in the order ``strategy_state`` gave: Flower iterates these dicts.
    """
    inner = inner_strategy(strategy)
    attributes = state_attributes(inner)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for flat, array in arrays.items():
        name, separator, key = flat.partition(SEPARATOR)
        if name not in attributes or not separator:
            raise ValueError(f"{flat!r} is not part of the state of {type(inner).__name__}")
        grouped.setdefault(name, {})[key] = array
    for name, container in attributes.items():
        items = grouped.get(name)
        setattr(inner, name, None if items is None else _container(container, items))


def _items(value: dict | list | ArrayRecord) -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(value, ArrayRecord):
        return ((key, array.numpy()) for key, array in value.items())
    if isinstance(value, list):
        return ((str(index), array) for index, array in enumerate(value))
    return iter(value.items())


def _container(container: type, items: dict[str, np.ndarray]) -> dict | list | ArrayRecord:
    if container is ArrayRecord:
        return ArrayRecord({key: Array(np.asarray(v, order="C")) for key, v in items.items()})
    if container is list:
        return [items[str(index)] for index in range(len(items))]
    return dict(items)


def flower_state(strategy: Strategy) -> dict[str, Any]:
    """The state tree of a Flower strategy: its class, its arrays and its None attributes.

    ``{"class": name, "arrays": strategy_state(...), "none": none_attributes(...)}``.
    """
    return {
        "class": type(inner_strategy(strategy)).__name__,
        "arrays": strategy_state(strategy),
        "none": none_attributes(strategy),
    }


def load_flower_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Put back a ``flower_state`` tree; refuses one of another class or missing attributes."""
    name = type(inner_strategy(strategy)).__name__
    saved_class = state.get("class")
    if saved_class not in (None, name):
        raise ValueError(
            f"the state was written by {saved_class}, not {name}: resume with the same "
            "strategy as the run that wrote it"
        )
    arrays = state.get("arrays", {})
    saved = {k.partition(SEPARATOR)[0] for k in arrays}
    missing = sorted(set(state_attributes(strategy)) - saved - set(state.get("none", ())))
    if missing:
        raise ValueError(
            f"the state lacks the {name} state {missing} (written by an older version?): it "
            "cannot resume this run exactly; start it again without server.resume"
        )
    load_strategy_state(strategy, arrays)
