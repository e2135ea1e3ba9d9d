"""Turning a batch into the LLM's input embeddings: text embeddings, image features scattered into
the ``<image>`` placeholders, and the latency token inserted where the scheduler reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.token_selection.base import TokenSelector, compact, gather_positions

_ONE_PIXEL = Image.new("RGB", (1, 1))  # preprocessed only for its output shape


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
        if torch.is_grad_enabled():  # training a text-only batch: the image side runs all the same (see below)
            embeds = embeds + 0.0 * blank_image_features(backbone, embeds).sum()
        return embeds
    visual = backbone.encode_images(pixel_values)
    features = backbone.project(visual.features).to(embeds.dtype)  # [N_img, N, hidden]
    if int(placeholders.sum()) != features.shape[0] * features.shape[1]:
        raise ValueError(
            f"{int(placeholders.sum())} <image> placeholders in the batch but {features.shape[0]} images x "
            f"{features.shape[1]} features: every image needs exactly {features.shape[1]} placeholders"
        )
    return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]))


def blank_image_features(backbone: Backbone, like: torch.Tensor) -> torch.Tensor:
    """[1, N, hidden] the projected features of one blank (all-zero) image.

    A training batch without images still runs the vision tower and projector on it, weighted 0, as the LLaVA
    release does for its text-only records (a zero image, its features cut to length 0): every process then runs
    the same modules in every step, which ZeRO-3 needs (it gathers each module's weights as it runs; a process
    that skipped the tower would leave the others waiting), and the projector gets a zero gradient, not none."""
    shape = backbone.preprocess_image(_ONE_PIXEL).shape  # [3, H, W]
    pixels = torch.zeros(1, *shape, device=like.device, dtype=next(backbone.parameters()).dtype)
    return backbone.project(backbone.encode_images(pixels).features).to(like.dtype)


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


@dataclass
class SelectedInputs:
    """The LLM's inputs once a token selector chose the visual tokens before the LLM."""

    embeds: torch.Tensor  # [B, T', H]
    attention_mask: torch.Tensor  # [B, T'], same dtype as the input mask
    image_mask: torch.Tensor  # [B, T'] bool, the positions holding image features
    labels: torch.Tensor | None  # [B, T'], IGNORE_INDEX on new padding
    source_index: torch.Tensor | None  # [B, T'] input column of each position, -1 = padding; None = unchanged


def embed_selected(
    backbone: Backbone,
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    pixel_values: torch.Tensor | None,  # [N_img, 3, H, W]
    token_selector: TokenSelector | None = None,
    labels: torch.Tensor | None = None,  # [B, T]
) -> SelectedInputs:
    """:func:`embed_multimodal` with the selector's ``before_llm`` hook: each image keeps the first
    ``n_i`` of its ``N`` placeholders (``n_i`` = tokens the selector kept for it), the others leave the
    sequence (:func:`~adaptive_mllm.token_selection.base.compact`, left padding) with their mask and
    labels, and the selected features fill the kept placeholders. Without such a hook: unchanged."""
    placeholders = input_ids == backbone.image_token_id  # [B, T]
    if pixel_values is None or token_selector is None or not token_selector.selects_before_llm:
        embeds = embed_multimodal(backbone, input_ids, pixel_values)
        return SelectedInputs(embeds, attention_mask, placeholders & attention_mask.bool(), labels, None)
    visual = backbone.encode_images(pixel_values, with_attention=token_selector.needs_visual_attention)
    visual = token_selector.before_llm(visual)
    features = backbone.project(visual.features)  # [N_img, n_max, hidden]
    num_images, width = features.shape[:2]
    token_mask = visual.token_mask if visual.token_mask is not None else features.new_ones(num_images, width, dtype=torch.bool)
    per_image = backbone.num_image_tokens
    if int(placeholders.sum()) != num_images * per_image:
        raise ValueError(
            f"{int(placeholders.sum())} <image> placeholders in the batch but {num_images} images: every image "
            f"needs exactly {per_image} placeholders"
        )
    # the j-th placeholder of image i stays when j < n_i
    flat_index = placeholders.flatten().long().cumsum(0).view_as(placeholders) - 1  # [B, T], over the batch
    image_index = (flat_index // per_image).clamp(0, max(num_images - 1, 0))
    counts = token_mask.sum(-1)  # [N_img]
    kept_placeholder = placeholders & (flat_index % per_image < counts[image_index])
    keep = attention_mask.bool() & (~placeholders | kept_placeholder)  # [B, T]
    source, new_mask = compact(keep)  # [B, T'], [B, T']
    embeds = gather_positions(backbone.embed(input_ids), source)  # [B, T', H]
    image_mask = gather_positions(placeholders, source, False)  # [B, T'] bool
    embeds = embeds.masked_scatter(image_mask[..., None], features[token_mask].to(embeds.dtype))
    new_labels = None if labels is None else gather_positions(labels, source, IGNORE_INDEX)
    return SelectedInputs(embeds, new_mask.to(attention_mask.dtype), image_mask, new_labels, source)
