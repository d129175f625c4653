"""Client metrics the server accepts, and their aggregation key by key.

Flower's ``aggregate_metricrecords`` needs every reply to carry the same keys with the same
types; one client that omits a key, or sends a list where others send a number, would drop
the key for everyone or raise. Here each metric is a finite number or a list of finite
numbers, at most 1e30 in magnitude (checked per reply), and each key is averaged over the
replies that report it:
``m_k = sum_{i in R_k} w_i m_{i,k} / sum_{i in R_k} w_i``. A key's form (a number, or a list
of some length) is the one most of its reporters use; a reply with another form is left out
of that key (and logged) instead of failing the round or removing the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import WARNING

from flwr.app import MetricRecord
from flwr.common import log

#: Most values in one reply's metrics (numbers, counting each list element): real ones ~10.
MAX_METRIC_VALUES = 4096
#: Longest accepted metric name (names are kept for every round of the run).
MAX_METRIC_NAME_CHARS = 128
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
        if len(name) > MAX_METRIC_NAME_CHARS:
            raise MetricError(f"a metric name is {len(name)} characters long")
        values = value if isinstance(value, list) else [value]
        count += len(values)
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
    """Weighted mean of each key over the replies that report it (``skip``: the weight key).

    A key's form (a number, or a list of some length) is what most of its reporters send
    (ties: the first reply's); replies that send another form are left out of that key, and
    logged, so one client cannot remove a key from everyone's aggregate.
    """
    keys = sorted({k for m in metrics for k in m if k != skip})
    aggregated = MetricRecord()
    for key in keys:
        reports = [(m[key], w) for m, w in zip(metrics, weights, strict=True) if key in m]
        forms = [_form(v) for v, _ in reports]
        common = max(dict.fromkeys(forms), key=forms.count)  # first of the most frequent
        agreeing = [(v, w) for (v, w), f in zip(reports, forms, strict=True) if f == common]
        if len(agreeing) < len(reports):
            log(
                WARNING,
                "metric %r: %d of %d replies send it in another form; left out of it",
                key,
                len(reports) - len(agreeing),
                len(reports),
            )
        total = sum(w for _, w in agreeing)
        if total <= 0:
            continue
        if common is None:
            aggregated[key] = math.fsum(v * w for v, w in agreeing) / total
        else:
            aggregated[key] = [
                math.fsum(v[i] * w for v, w in agreeing) / total for i in range(common)
            ]
    return aggregated


def _form(value: float | int | list[float | int]) -> int | None:
    """None for a number, the length for a list."""
    return len(value) if isinstance(value, list) else None
