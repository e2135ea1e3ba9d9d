"""Online correction of the latency model: a running ratio of measured to predicted time.

A profile is measured once; the machine then changes (another process takes half the cores, a GPU is
shared). Every answered batch reports (predicted, measured) milliseconds; the exponential moving average
of their ratio scales the next predictions, so the server lowers budgets when the machine slows down and
raises them again when it recovers. It rises faster than it falls: a slowdown costs deadlines until the
ratio has caught up, a recovery only costs some budget for a few more batches.
"""

from __future__ import annotations

import math


class RunningRatio:
    """Exponential moving average of ``measured / predicted``, starting at 1 (the profile is right).

    Args:
        rise: weight of the newest ratio when it is above the average (0 < rise <= 1): 0.7 takes most of
            a slowdown at once.
        fall: weight of the newest ratio when it is below the average: 0.2 comes back over several batches.
        low, high: the ratio is kept within these bounds, so one freak measurement cannot make every
            later deadline look unmeetable (or free).
    """

    def __init__(self, rise: float = 0.7, fall: float = 0.2, low: float = 0.05, high: float = 20.0) -> None:
        for name, weight in (("rise", rise), ("fall", fall)):
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"{name} {weight} must be in (0, 1]")
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got low={low}, high={high}")
        self.rise = rise
        self.fall = fall
        self.low = low
        self.high = high
        self.value = 1.0
        self.updates = 0

    def update(self, predicted_ms: float, measured_ms: float) -> float:
        """Fold in one observation; returns the new ratio. Non-positive or non-finite times are ignored."""
        if not (predicted_ms > 0 and measured_ms > 0 and math.isfinite(predicted_ms) and math.isfinite(measured_ms)):
            return self.value
        ratio = min(max(measured_ms / predicted_ms, self.low), self.high)
        weight = self.rise if ratio > self.value else self.fall
        self.value = (1.0 - weight) * self.value + weight * ratio
        self.updates += 1
        return self.value
