"""The server's float32 moving average of the global model (the paper's w_bar)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ServerMovingAverage:
    """``w_bar_t = lam_t * w_bar_{t-1} + (1 - lam_t) * w_t``, started at ``start_round``.

    ``decay`` is the paper's lambda (0 turns the average off). With ``warmup`` the decay is
    ``min(decay, (1 + n) / (10 + n))`` after n updates, as TensorFlow's ExponentialMovingAverage
    does with ``num_updates``: early models then fade fast instead of dominating for tens of
    rounds. Only floating-point arrays are averaged; integer buffers take the newest value.
    """

    decay: float = 0.9
    start_round: int = 1
    warmup: bool = False
    average: dict[str, np.ndarray] | None = field(default=None, repr=False)
    num_updates: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"moving-average decay must be in [0, 1), got {self.decay}")
        if self.start_round < 1:
            raise ValueError(f"moving-average start round must be >= 1, got {self.start_round}")

    @property
    def enabled(self) -> bool:
        """Whether averaging happens at all (decay > 0)."""
        return self.decay > 0.0

    def decay_at(self, num_updates: int) -> float:
        """The lambda applied at the update that follows ``num_updates`` earlier ones."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

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
