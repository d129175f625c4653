"""Server-side strategies: the low-precision wrapper and the server moving average."""

from .low_precision import LowPrecisionStrategy, RoundTraffic
from .moving_average import ServerMovingAverage

__all__ = ["LowPrecisionStrategy", "RoundTraffic", "ServerMovingAverage"]
