"""Turning a batch into the LLM's input embeddings: text embeddings, image features scattered into
the ``<image>`` placeholders, and the latency token inserted where the scheduler reads it."""

from __future__ import annotations

import torch

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.backbones.templates import IGNORE_INDEX


def embed_multimodal(
    backbone: Backbone,
    input_ids: torch.Tensor,  # [B, T]
    pixel_values: torch.Tensor | None,  # [N_img, 3, H, W], one per example with an image, in batch order
) -> torch.Tensor:
    """[B, T, hidden]: token embeddings with each ``<image>`` placeholder replaced by a projected patch."""
    embeds = backbone.embed(input_ids)
    placeholders = input_ids == backbone.image_token_id  # [B, T]
    if pixel_values is None:
        if bool(placeholders.any()):
            raise ValueError("the batch holds <image> placeholders but no pixel_values")
        return embeds
    visual = backbone.encode_images(pixel_values)
    features = backbone.project(visual.features).to(embeds.dtype)  # [N_img, N, hidden]
    if int(placeholders.sum()) != features.shape[0] * features.shape[1]:
        raise ValueError(
            f"{int(placeholders.sum())} <image> placeholders in the batch but {features.shape[0]} images x "
            f"{features.shape[1]} features: every image needs exactly {features.shape[1]} placeholders"
        )
    return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]))


def insert_token(
    embeds: torch.Tensor,  # [B, T, H]
    token: torch.Tensor,  # [B, H]
    positions: torch.Tensor,  # [B], the index the token will have
    attention_mask: torch.Tensor,  # [B, T]
    labels: torch.Tensor | None = None,  # [B, T]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert one token per example at its own position; its label is ignored. Returns length T + 1."""
    batch, length, _ = embeds.shape
    device = embeds.device
    new_index = torch.arange(length + 1, device=device)[None, :].expand(batch, -1)  # [B, T+1]
    at = positions[:, None]
    source = torch.where(new_index < at, new_index, new_index - 1).clamp(min=0)  # old index for each new slot
    is_token = new_index == at
    gathered = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))
    out = torch.where(is_token[..., None], token[:, None, :].to(embeds.dtype), gathered)
    mask = torch.where(is_token, torch.ones_like(attention_mask[:, :1]), attention_mask.gather(1, source))
    new_labels = None
    if labels is not None:
        new_labels = torch.where(is_token, torch.full_like(labels[:, :1], IGNORE_INDEX), labels.gather(1, source))
    return out, mask, new_labels


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
