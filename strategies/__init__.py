"""Server-side building blocks: strategy wrappers around any Flower strategy, one job each.

* ``QuantizedMessages``: quantized broadcast, validated, dequantized and counted replies;
* ``ServerMovingAverage``: the server's float32 moving average of the model;
* ``ReproducibleSampling``: client sampling as a function of the seed and the round;
* ``ResumableRun``: round numbering, lineage and per-round metrics across resumptions;
* ``LowPrecisionStrategy``: the four composed, as this app uses them.
"""

from .low_precision import LowPrecisionStrategy
from .moving_average import ServerMovingAverage
from .quantized_messages import (
    TRAFFIC_METRICS,
    FederationStalledError,
    PhaseTraffic,
    QuantizedMessages,
    RoundTraffic,
    is_traffic_metric,
)
from .run import ResumableRun, RoundMetrics
from .sampling import ReproducibleSampling
from .wrapper import StrategyWrapper, find_wrapper

__all__ = [
    "TRAFFIC_METRICS",
    "FederationStalledError",
    "LowPrecisionStrategy",
    "PhaseTraffic",
    "QuantizedMessages",
    "ReproducibleSampling",
    "ResumableRun",
    "RoundMetrics",
    "RoundTraffic",
    "ServerMovingAverage",
    "StrategyWrapper",
    "find_wrapper",
    "is_traffic_metric",
]
