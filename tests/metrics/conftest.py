"""Shared examples of the metric tests."""

from __future__ import annotations

import torch
from torchmetrics import Metric

# color: 1 of 2, count: 2 of 3, yesno: 1 of 1, shape: no example; overall 4 of 6
PREDICTIONS = ["Red", "blue", "two", "3", "4", "No."]
REFERENCES = ["red", "green", "2", "three", "5", "no"]
GROUPS = ["color", "color", "count", "count", "count", "yesno"]
KINDS = ["color", "count", "yesno", "shape"]


def scores_of(metric: Metric) -> dict[str, float]:
    return values_of(metric.compute())


def values_of(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}
