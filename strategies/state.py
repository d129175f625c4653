"""The inner Flower strategy's between-round state as named arrays, for server checkpoints.

FedAdam, FedYogi and FedAdagrad (``FedOpt``) keep the last broadcast model and their moments;
FedAvgM keeps its reference model and momentum. A resumed run must get them back to continue
exactly where the killed one stopped. Only the classes in ``STATE_ATTRIBUTES`` are known to
keep state; every other strategy (FedAvg, FedProx, FedMedian, ...) contributes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from .low_precision import LowPrecisionStrategy

#: Stateful Flower strategies (subclasses included): attribute -> the container Flower keeps.
STATE_ATTRIBUTES: dict[type[Strategy], dict[str, type]] = {
    FedOpt: {"current_arrays": dict, "m_t": dict, "v_t": dict},
    FedAvgM: {"current_arrays": ArrayRecord, "momentum_vector": list},
}
SEPARATOR = "/"


def inner_strategy(strategy: Strategy) -> Strategy:
    """The Flower strategy inside any ``LowPrecisionStrategy`` wrappers."""
    while isinstance(strategy, LowPrecisionStrategy):
        strategy = strategy.inner
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
