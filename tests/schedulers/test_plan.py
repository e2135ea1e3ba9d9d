"""MLP groups when the width does not divide: the release's split (``AdaLlamaMLP``), the first ``I mod G``
groups one neuron wider."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.layers import mlp_group_sizes
from adaptive_mllm.schedulers.plan import mlp_group_neurons, widen_mlp_mask


def test_vicuna_13b_split() -> None:
    # 13824 = 40 x 345 + 24: the release gives 24 groups of 346 neurons, then 16 of 345
    sizes = mlp_group_sizes(13824, 40)
    assert sizes == [346] * 24 + [345] * 16
    assert sum(sizes) == 13824
    assert mlp_group_sizes(128, 8) == [16] * 8


def test_bad_group_count() -> None:
    with pytest.raises(ValueError, match="non-empty groups"):
        mlp_group_sizes(4, 8)


def test_neurons_of_kept_groups() -> None:
    # 10 neurons in 4 groups: sizes 3, 3, 2, 2 -> groups own [0, 3), [3, 6), [6, 8), [8, 10)
    assert mlp_group_neurons(torch.tensor([1, 2]), 10, 4).tolist() == [3, 4, 5, 6, 7]
    assert mlp_group_neurons(torch.tensor([0, 3]), 10, 4).tolist() == [0, 1, 2, 8, 9]
    assert mlp_group_neurons(torch.tensor([1, 3]), 8, 4).tolist() == [2, 3, 6, 7]  # equal groups of 2


def test_widened_mask_follows_the_groups() -> None:
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], requires_grad=True)
    wide = widen_mlp_mask(mask, 10)
    assert wide.tolist() == [[1, 1, 1, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]]
    wide.sum().backward()  # gradients reach each group once per neuron
    assert mask.grad.tolist() == [[3, 3, 2, 2], [3, 3, 2, 2]]
