"""bench/visual_tokens.py's statistics, against independent computations on synthetic tokens."""

from __future__ import annotations

import numpy as np
import torch

from bench.visual_tokens import explained_variance, probe_accuracy


def test_explained_variance_is_between_over_between_plus_within() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    means = torch.randn(3, 8, generator=generator) * 2
    tokens = means[labels] + torch.randn(600, 8, generator=generator)
    # independently: within-class sum of squares, from numpy, and total = between + within
    x, y = tokens.numpy().astype(np.float64), labels.numpy()
    within = sum(((x[y == c] - x[y == c].mean(0)) ** 2).sum() for c in range(3))
    total = ((x - x.mean(0)) ** 2).sum()
    assert abs(explained_variance(tokens, labels) - (total - within) / total) < 1e-5
    assert explained_variance(means[labels], labels) > 0.999  # no noise: labels explain everything
    assert explained_variance(torch.randn(600, 8, generator=generator), labels) < 0.02  # unrelated


def test_probe_reads_a_weak_but_clean_direction_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (900,), generator=generator)
    loud = torch.randn(900, 16, generator=generator) * 10  # variance that says nothing about the label
    quiet = torch.nn.functional.one_hot(labels, 3).float() * 0.5 + 0.05 * torch.randn(900, 3, generator=generator)
    tokens = torch.cat([quiet, loud], dim=1)  # the label lives in a small share of the variance
    assert explained_variance(tokens, labels) < 0.01
    assert probe_accuracy(tokens, labels) > 0.95  # chance is 1/3: the probe finds it despite the loud rest
    assert probe_accuracy(loud, labels) < 0.45
