"""Online correction of the latency model: a high quantile of recent measured / predicted ratios.

A profile is measured once; the machine then changes (another process takes half the cores, a GPU is
shared). Every answered batch reports (predicted, measured) milliseconds, and predictions are scaled by
a high quantile (default the 90th percentile) of the last ratios, or the latest ratio when that is higher.
A quantile, not a mean: a deadline is missed by the slow answers, and when another process shares the
cores the times spread as well as grow, so a mean would keep half the answers on the slow side of the
prediction. It rises with the first slow batch, and falls back only when the slow batches have left the
window: a slowdown costs the deadline of the batch that was running when it began, a recovery only some
budget for a few more batches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable


class RunningRatio:
    """The ``quantile`` of the last ``window`` ratios ``measured / predicted``, or the latest one when higher;
    1 before the first (the profile is right).

    Args:
        window: how many recent batches count (20: a change is followed within a few, and forgotten after 20).
        quantile: 0.9 takes the second slowest of 20 batches.
        low, high: each ratio is kept within these bounds, so one freak measurement cannot make every later
            deadline look unmeetable (or free).
    """

    def __init__(self, window: int = 20, quantile: float = 0.9, low: float = 0.05, high: float = 20.0) -> None:
        if window < 1:
            raise ValueError(f"window {window} must be >= 1")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile {quantile} must be in [0, 1]")
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got low={low}, high={high}")
        self.quantile = quantile
        self.low = low
        self.high = high
        self.ratios: deque[float] = deque(maxlen=window)
        self.value = 1.0
        self.updates = 0

    def update(self, predicted_ms: float, measured_ms: float) -> float:
        """Fold in one observation; returns the new correction. Non-positive or non-finite times are ignored."""
        if not (predicted_ms > 0 and measured_ms > 0 and math.isfinite(predicted_ms) and math.isfinite(measured_ms)):
            return self.value
        self.ratios.append(min(max(measured_ms / predicted_ms, self.low), self.high))
        self.value = max(upper_quantile(self.ratios, self.quantile), self.ratios[-1])
        self.updates += 1
        return self.value


def upper_quantile(values: Iterable[float], quantile: float) -> float:
    """The ``quantile`` of ``values`` by the nearest rank at or above it (never interpolated down)."""
    ordered = sorted(values)
    return ordered[math.ceil(quantile * (len(ordered) - 1))]
