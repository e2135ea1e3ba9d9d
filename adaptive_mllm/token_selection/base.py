"""TokenSelector: which visual tokens reach the LLM, and how removed tokens leave the batch.

A selector has two optional hooks:

- ``before_llm`` works on the vision tower's :class:`VisualFeatures` (PruMerge): it returns, per
  image, the features to project, possibly a different number per image, padded, with ``token_mask``;
- ``after_layer`` runs inside the LLM after its first ``layer_index`` layers (FastV): the engine hands
  it the attention each position received in layer ``layer_index - 1`` from each row's last real query
  position (:func:`last_query_attention`, FastV's rule) and it answers which positions stay.

A selector knows nothing of schedulers, and the other way round; the module calls ``before_llm``
(through :func:`adaptive_mllm.inputs.embed_selected`), the engine calls ``after_layer``.

**Removed tokens are taken out of the sequence, never masked in place.** That is what makes the
matrix products (and the KV cache) physically smaller, which is the point of token selection:

- every removal is a :func:`compact`: the kept positions of each row, in their order, right-aligned
  (the result is *left*-padded, what generation needs; a right-padded training batch becomes
  left-padded, which changes nothing for the loss because labels travel with their tokens);
- ``source_index`` [B, T'] records, for every new position, the column it came from (-1 = padding),
  so labels, image-token masks and the latency token's position are gathered / remapped with it;
- **positions**: a token removed before the LLM (PruMerge) is as if it had never been in the prompt,
  so position ids are recounted from the new attention mask (the reference inserts fewer features);
  a token removed inside the LLM (FastV) keeps its original rotary position for the layers after the
  drop (as the FastV reference keeps ``position_ids`` of kept tokens), and decoding continues from
  the prompt's last original position;
- **KV cache**: layers before an in-LLM drop cache every prompt token, layers after it only the kept
  ones; the cache keeps one key mask per side of the drop (see ``engine.PlanCache``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaptive_mllm.backbones.base import VisualFeatures


@dataclass
class TokenLayout:
    """Where the image tokens are; travels with the batch through the engine.

    The engine fills ``source_index`` and ``keep`` when it drops tokens inside the LLM. A layout given
    with ``keep`` already set replays that decision instead of asking the selector (recomputing a
    cached generation from scratch with exactly the tokens the prefill kept).
    """

    image_mask: torch.Tensor  # [B, T] bool, image tokens among the engine's input positions
    # [B] the column whose attention ranks the tokens: the prompt's last (in training, before the answer);
    # None = each row's last real token, which is the prompt's last when a prompt is being answered
    query_positions: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # [B, T] bool, positions kept by the in-LLM drop
    source_index: torch.Tensor | None = None  # [B, T'] input column of each position after the drop, -1 = padding


class TokenSelector(nn.Module):
    """Base class: the identity selector (every visual token is kept)."""

    #: the first ``layer_index`` LLM layers see every token; ``after_layer`` runs after them. None = no in-LLM hook.
    layer_index: int | None = None
    #: whether ``before_llm`` needs ``VisualFeatures.cls_attention`` and ``keys`` from the vision tower.
    needs_visual_attention: bool = False

    @property
    def selects_before_llm(self) -> bool:
        return type(self).before_llm is not TokenSelector.before_llm

    def before_llm(self, visual: VisualFeatures) -> VisualFeatures:
        """[N_img, N, C] features -> [N_img, n_max, C] features with ``token_mask`` [N_img, n_max]."""
        return visual

    def after_layer(
        self,
        received: torch.Tensor,  # [B, T] attention received from the last real query position, mean over heads
        image_mask: torch.Tensor,  # [B, T] bool
        attention_mask: torch.Tensor,  # [B, T] bool, real tokens
    ) -> torch.Tensor:
        """[B, T] bool: the positions that stay after layer ``layer_index``."""
        return attention_mask.bool()

    def kept_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B] long: image tokens left after ``after_layer`` out of ``image_tokens`` [B]."""
        return image_tokens

    def layer_tokens(
        self,
        seq_lens: torch.Tensor,  # [B] tokens entering the LLM
        image_tokens: torch.Tensor,  # [B] image tokens among them
        num_layers: int,
    ) -> torch.Tensor | None:
        """[B, L] tokens reaching each LLM layer (what the cost model counts); None = ``seq_lens`` everywhere."""
        if self.layer_index is None:
            return None
        dropped = image_tokens - self.kept_image_tokens(image_tokens)  # [B]
        tokens = seq_lens[:, None].expand(-1, num_layers).clone()  # [B, L]
        tokens[:, self.layer_index :] -= dropped[:, None]
        return tokens


# --- moving tokens out of a batch ------------------------------------------------------------------
def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept positions of each row, in order, right-aligned (left padding).

    Returns ``source_index`` [B, T'] (the column each new position came from, -1 = padding) and the
    new attention mask [B, T'] bool, with ``T'`` the largest number kept by any row.
    """
    batch, length = keep.shape
    counts = keep.sum(-1)  # [B]
    width = int(counts.max()) if batch else 0
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, then kept, each in order
    source = order[:, length - width :]  # [B, T']
    mask = torch.arange(width, device=keep.device)[None, :] >= (width - counts)[:, None]  # [B, T']
    return torch.where(mask, source, torch.full_like(source, -1)), mask


def gather_positions(values: torch.Tensor, source_index: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
    """values [B, T, ...] -> [B, T', ...] at ``source_index`` [B, T']; ``fill`` where it is -1."""
    index = source_index.clamp(min=0)
    shape = index.shape + values.shape[2:]
    gathered = values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    padding = (source_index < 0).view(*index.shape, *([1] * (values.dim() - 2)))
    return gathered.masked_fill(padding, fill)


def remap_positions(source_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] old columns -> [B] new columns (a column past the end maps past the new end)."""
    return (source_index < positions[:, None]).sum(-1)


def insert_column(values: torch.Tensor, positions: torch.Tensor, fill: bool | int = False) -> torch.Tensor:
    """values [B, T] -> [B, T + 1] with ``fill`` at ``positions`` [B] (as ``inputs.insert_token`` does)."""
    batch, length = values.shape
    new_index = torch.arange(length + 1, device=values.device)[None, :].expand(batch, -1)  # [B, T+1]
    at = positions[:, None]
    source = torch.where(new_index < at, new_index, new_index - 1).clamp(min=0)
    return torch.where(new_index == at, torch.full_like(values[:, :1], fill), values.gather(1, source))


def last_query_attention(
    probs: torch.Tensor, key_mask: torch.Tensor, query_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, ..., T_q, T_k] attention probabilities (e.g. per head), [B, T] real-token mask -> [B, ..., T_k]: the row
    of each example's last real query position, as FastV ranks tokens (``[0][-1]`` in its modeling_llama.py).
    Left-padded prompts end at the last column; right-padded rows at their last real token. ``query_positions``
    [B] picks other rows: a teacher-forced batch ranks from the prompt's end, as its answer is generated."""
    length = key_mask.shape[1]
    last = length - 1 - key_mask.flip(1).to(torch.int8).argmax(1) if query_positions is None else query_positions  # [B]
    return probs[torch.arange(probs.shape[0], device=probs.device), ..., last.to(probs.device), :]


def kept_count(total: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """``floor((1 - R) * N)`` per row, as FastV's KV-cache code truncates (``topk(int(576 * ratio))``), with a
    tolerance for the float subtraction: R = 0.9, N = 10 keeps 1 (``(1 - 0.9) * 10`` is ``0.9999999999999998``)."""
    return torch.floor(total.double() * (1.0 - drop_ratio) + 1e-6).long()

