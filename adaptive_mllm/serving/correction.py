"""Online correction of the latency model: a running ratio of measured to predicted time.

A profile is measured once; the machine then changes (another process takes half the cores, a GPU is
shared). Every answered batch reports (predicted, measured) milliseconds; the exponential moving average
of their ratio scales the next predictions, so the server lowers budgets when the machine slows down and
raises them again when it recovers.
"""

from __future__ import annotations

import math


class RunningRatio:
    """Exponential moving average of ``measured / predicted``, starting at 1 (the profile is right).

    Args:
        weight: weight of the newest ratio (0 < weight <= 1): 0.3 follows a change within a few batches.
        low, high: the ratio is kept within these bounds, so one freak measurement cannot make every
            later deadline look unmeetable (or free).
    """

    def __init__(self, weight: float = 0.3, low: float = 0.05, high: float = 20.0) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight {weight} must be in (0, 1]")
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got low={low}, high={high}")
        self.weight = weight
        self.low = low
        self.high = high
        self.value = 1.0
        self.updates = 0

    def update(self, predicted_ms: float, measured_ms: float) -> float:
        """Fold in one observation; returns the new ratio. Non-positive or non-finite times are ignored."""
        if not (predicted_ms > 0 and measured_ms > 0 and math.isfinite(predicted_ms) and math.isfinite(measured_ms)):
            return self.value
        ratio = min(max(measured_ms / predicted_ms, self.low), self.high)
        self.value = (1.0 - self.weight) * self.value + self.weight * ratio
        self.updates += 1
        return self.value
