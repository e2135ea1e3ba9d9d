"""FastV (arXiv 2403.06764): after the LLM's first K layers, drop the image tokens that receive the
least attention.

The engine computes, in layer ``K - 1`` only (0-based; every other layer keeps SDPA), the attention
probabilities, and hands on what each position received from the example's LAST real query position,
averaged over heads, as the official code ranks them (``torch.mean(attention, dim=1)[0][-1]``; a mean
over all queries would favour early tokens under the causal mask). Per example, the ``floor((1 - R) N)``
image tokens with the most received attention stay (FastV's KV-cache code: ``topk(int(576 * ratio))``); text tokens (the latency token too) always stay. Layers ``K ..`` run on the shorter sequence; kept tokens keep
their rotary positions. AdaLLaVA's table uses K = 2, R = 0.5.
"""

from __future__ import annotations

import torch

from adaptive_mllm.token_selection.base import TokenSelector, kept_count


class FastV(TokenSelector):
    """Drops the ``drop_ratio`` image tokens the last query attends to least, after layer ``layer_index``.

    Args:
        layer_index: K, the number of LLM layers that see every token (>= 1); with a scheduler it must not
            exceed the scheduler's ``num_prefix_layers`` (the ranking layer must always run).
        drop_ratio: R, the fraction of each example's image tokens dropped (in [0, 1)).
    """

    def __init__(self, layer_index: int = 2, drop_ratio: float = 0.5) -> None:
        super().__init__()
        if layer_index < 1:
            raise ValueError(f"layer_index={layer_index} must be >= 1: FastV ranks tokens by a layer's attention")
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio={drop_ratio} must be in [0, 1)")
        self.layer_index = layer_index
        self.drop_ratio = drop_ratio

    def kept_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return kept_count(image_tokens, self.drop_ratio)

    def after_layer(
        self,
        received: torch.Tensor,  # [B, T]
        image_mask: torch.Tensor,  # [B, T] bool
        attention_mask: torch.Tensor,  # [B, T] bool
    ) -> torch.Tensor:
        keep_images = self.kept_image_tokens(image_mask.sum(-1))  # [B]
        scores = received.float().masked_fill(~image_mask, float("-inf"))  # [B, T]
        order = scores.argsort(dim=-1, descending=True, stable=True)  # image tokens first, most attended first
        rank = order.argsort(dim=-1)  # [B, T]: each position's place in that order
        kept_images = image_mask & (rank < keep_images[:, None])
        return attention_mask.bool() & (~image_mask | kept_images)
