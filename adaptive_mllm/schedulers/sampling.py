"""Hard picks with straight-through gradients: how a scheduler turns logits into 0/1 masks.

Training adds Gumbel noise (so the plan explores), evaluation is deterministic. The returned masks
are exactly 0/1 in the forward pass and carry the gradient of a temperature softmax. We write the
straight-through estimator as ``hard + (soft - soft.detach())``: the same gradient as the reference's
``hard - soft.detach() + soft``, with a forward value that is ``hard`` by construction
(``x - x == 0`` in floating point), so masks can be compared and counted exactly.
"""

from __future__ import annotations

import torch


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples shaped like ``like``: ``-log(E)`` with ``E ~ Exp(1)``."""
    exponential = torch.empty_like(like).exponential_().clamp_min(torch.finfo(like.dtype).tiny)
    return -exponential.log()


def gumbel_top_r(logits: torch.Tensor, r: int, tau: float, training: bool) -> torch.Tensor:
    """[B, N] -> [B, N] mask with ``r`` ones per row: the top ``r`` of ``logits`` (+ Gumbel noise in
    training); entries at ``-inf`` are never picked. The gradient is that of
    ``softmax((logits + noise) / tau)`` (one soft vector for the ``r`` picks, as in the reference). Ties keep the
    lower index, as :func:`top_k_mask` (``topk`` leaves them to the kernel), so the pick loop and the ranked plan agree."""
    scores = logits + gumbel_noise(logits) if training else logits  # -inf stays -inf
    soft = torch.softmax(scores / tau, dim=-1)  # [B, N]
    index = scores.argsort(dim=-1, descending=True, stable=True)[..., :r]  # [B, r]
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard + (soft - soft.detach())


def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] 0/1: the ``k[b]`` largest entries of each row (ties: the lower index first).

    What picking one at a time without noise gives, in a handful of kernels instead of ``k.max()`` rounds
    of them: on a GPU each round is a dozen launches, which a batch-1 prefill would wait for."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [B, N]
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # [B, N] rank of each entry
    return (rank < k.to(scores.device)[:, None]).to(scores.dtype)


def sample_k_of_n(logits: torch.Tensor, k: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Pick ``k[b]`` of the ``N`` entries of each row, one at a time, without replacement.

    Each pick masks what was already chosen (-inf), adds Gumbel noise in training, takes a hard
    one-hot with a straight-through ``softmax(./tau)``; the mask is the sum of the picks. In
    evaluation (no noise) this is a deterministic top-k. Vectorised over the batch; the loop runs over
    the picks, up to ``max(k)``.

    Args:
        logits: [B, N].
        k: [B] long, each in [0, N]; rows may differ.
    Returns:
        [B, N] mask, exactly ``k[b]`` ones in row ``b`` (0/1 values, straight-through gradients).
    """
    batch, n = logits.shape
    k = k.to(logits.device)
    if k.shape != (batch,):
        raise ValueError(f"k must have shape [{batch}], got {list(k.shape)}")
    if bool((k < 0).any()) or bool((k > n).any()):
        raise ValueError(f"k must be in [0, {n}], got {k.tolist()}")
    if not training and not torch.is_grad_enabled():  # inference: no noise, no gradient, one ranking
        return top_k_mask(logits, k)
    mask = torch.zeros_like(logits)
    chosen = torch.zeros_like(logits, dtype=torch.bool)  # [B, N]
    for pick_index in range(int(k.max()) if batch else 0):
        active = (pick_index < k).to(logits.dtype)[:, None]  # [B, 1]
        pick = gumbel_top_r(logits.masked_fill(chosen, float("-inf")), 1, tau, training)  # [B, N]
        pick = pick * active
        mask = mask + pick
        chosen = chosen | (pick.detach() > 0.5)
    return mask
