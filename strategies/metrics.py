"""Client metrics the server accepts, and their aggregation key by key.

Flower's ``aggregate_metricrecords`` needs every reply to carry the same keys with the same
types; one client that omits a key, or sends a list where others send a number, would drop
the key for everyone or raise. Here each metric is a finite number or a list of finite
numbers, at most 1e30 in magnitude (checked per reply), and each key is averaged over the
replies that report it:
``m_k = sum_{i in R_k} w_i m_{i,k} / sum_{i in R_k} w_i``. A key whose replies disagree on its
type or list length is left out of the aggregate (and logged) instead of failing the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import WARNING

from flwr.app import MetricRecord
from flwr.common import log

#: Most values in one reply's metrics (keys plus list elements): real replies carry ~10.
MAX_METRIC_VALUES = 4096
#: Largest accepted metric magnitude: weighted sums of such values (weights <= 1e12) stay
#: far from float overflow.
MAX_METRIC_MAGNITUDE = 1e30


class MetricError(ValueError):
    """A reply's metrics cannot be accepted; the text names the key."""


def checked_metrics(metrics: MetricRecord) -> dict[str, float | int | list[float | int]]:
    """The metrics as plain Python values; raises ``MetricError`` for non-finite or odd ones."""
    clean: dict[str, float | int | list[float | int]] = {}
    count = 0
    for name, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        count += 1 + len(values)
        if count > MAX_METRIC_VALUES:
            raise MetricError(f"more than {MAX_METRIC_VALUES} metric values")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise MetricError(f"metric {name!r} is not a number")
            if not math.isfinite(v):
                raise MetricError(f"metric {name!r} is not finite")
            if abs(v) > MAX_METRIC_MAGNITUDE:
                raise MetricError(f"metric {name!r} is {v:g}, beyond +-{MAX_METRIC_MAGNITUDE:g}")
        clean[name] = list(value) if isinstance(value, list) else value
    return clean


def aggregate_metrics(
    metrics: Sequence[Mapping[str, float | int | list[float | int]]],
    weights: Sequence[float],
    skip: str,
) -> MetricRecord:
    """Weighted mean of each key over the replies that report it (``skip``: the weight key)."""
    keys = dict.fromkeys(k for m in metrics for k in m if k != skip)
    aggregated = MetricRecord()
    for key in keys:
        reports = [(m[key], w) for m, w in zip(metrics, weights, strict=True) if key in m]
        total = sum(w for _, w in reports)
        if total <= 0:
            continue
        first = reports[0][0]
        if isinstance(first, list):
            if any(not isinstance(v, list) or len(v) != len(first) for v, _ in reports):
                log(WARNING, "metric %r: replies disagree on its list length; left out", key)
                continue
            aggregated[key] = [
                math.fsum(v[i] * w for v, w in reports) / total for i in range(len(first))
            ]
        else:
            if any(isinstance(v, list) for v, _ in reports):
                log(WARNING, "metric %r: some replies send a list, others a number; left out", key)
                continue
            aggregated[key] = math.fsum(v * w for v, w in reports) / total
    return aggregated
