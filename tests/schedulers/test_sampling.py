"""k picks without replacement: exact counts, deterministic evaluation, straight-through gradients."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.schedulers.sampling import gumbel_top_r, sample_k_of_n


@pytest.mark.parametrize("training", [True, False])
def test_exactly_k_ones_per_row(training: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 9)
    k = torch.tensor([0, 1, 3, 5, 8, 9])
    mask = sample_k_of_n(logits, k, tau=5.0, training=training)
    assert mask.shape == (6, 9)
    assert bool(((mask == 0) | (mask == 1)).all())  # exactly 0/1, not approximately
    assert mask.sum(-1).tolist() == k.float().tolist()


def test_eval_is_deterministic_top_k() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 12)
    k = torch.tensor([1, 2, 4, 7, 12])
    first = sample_k_of_n(logits, k, tau=5.0, training=False)
    torch.manual_seed(2)
    second = sample_k_of_n(logits, k, tau=5.0, training=False)
    assert torch.equal(first, second)
    for row in range(5):
        top = logits[row].topk(int(k[row])).indices
        expected = torch.zeros(12).index_fill_(0, top, 1.0)
        assert torch.equal(first[row], expected)


def test_training_explores() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(64, 10)
    k = torch.full((64,), 3)
    mask = sample_k_of_n(logits, k, tau=5.0, training=True)
    assert len({tuple(row.tolist()) for row in mask}) > 10  # equal logits: noise decides


def test_training_prefers_high_logits() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(2000, 4)
    logits[:, 0] = 3.0
    mask = sample_k_of_n(logits, torch.ones(2000, dtype=torch.long), tau=5.0, training=True)
    frequency = mask.mean(0)
    assert frequency[0] > 0.7 and bool((frequency[1:] < 0.15).all())


@pytest.mark.parametrize("training", [True, False])
def test_gradients_are_straight_through(training: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 7, requires_grad=True)
    weights = torch.randn(4, 7)
    mask = sample_k_of_n(logits, torch.tensor([0, 2, 3, 7]), tau=5.0, training=training)
    (mask * weights).sum().backward()
    grad = logits.grad
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[1:].abs().sum(-1) > 0).all())
    assert grad[0].abs().sum() == 0  # k = 0: no pick, no gradient


def test_k_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
        sample_k_of_n(torch.zeros(2, 4), torch.tensor([1, 5]), tau=1.0, training=False)
    with pytest.raises(ValueError, match="k must have shape"):
        sample_k_of_n(torch.zeros(2, 4), torch.tensor([1]), tau=1.0, training=False)


@pytest.mark.parametrize("training", [True, False])
def test_top_r_never_picks_excluded(training: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    logits[:, :3] = float("-inf")
    logits[:, 0] = float("-inf")
    mask = gumbel_top_r(logits, 3, tau=5.0, training=training)
    assert mask.sum(-1).tolist() == [3.0] * 50
    assert mask[:, :3].sum() == 0


def test_inference_top_k_equals_the_pick_loop() -> None:
    """Without gradients, evaluation ranks once instead of picking k times: the same masks."""
    torch.manual_seed(3)
    logits = torch.randn(200, 13)
    k = torch.randint(0, 14, (200,))
    looped = sample_k_of_n(logits, k, tau=5.0, training=False)  # gradients on: the pick loop
    with torch.no_grad():
        ranked = sample_k_of_n(logits, k, tau=5.0, training=False)
    assert torch.equal(ranked, looped.detach())
    assert ranked.sum(-1).tolist() == k.float().tolist()


def test_top_r_ties_keep_the_lower_index() -> None:
    """``topk`` leaves ties to the kernel (on the CPU it returned 25, 29, 28, ... of 40 zeros); the picks must not."""
    mask = gumbel_top_r(torch.zeros(3, 40, requires_grad=True), 8, tau=5.0, training=False)
    assert mask.detach()[:, :8].sum().item() == 24 and mask.detach()[:, 8:].sum().item() == 0
    tied = torch.tensor([[0.0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]])
    assert gumbel_top_r(tied, 3, tau=5.0, training=False).detach().nonzero()[:, 1].tolist() == [1, 2, 3]
