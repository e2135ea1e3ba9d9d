"""FastV inside the engine: exactly floor((1 - R) N) image tokens stay, the ones the last query token attends
to most at layer K - 1, averaged over heads, as the official code ranks them (checked against transformers'
own eager attention maps); text tokens and labels are untouched."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.engine import Engine, PlanCache
from adaptive_mllm.inputs import embed_multimodal, position_ids_from_mask
from adaptive_mllm.token_selection import FastV, TokenLayout
from adaptive_mllm.token_selection.base import kept_count
from tests.conftest import random_images, tiny_config

K = 2


def _backbone(tokenizer_dir, attn_implementation: str = "sdpa") -> LlavaBackbone:
    config = tiny_config(num_layers=4)
    config["vision"]["image_size"] = 64  # 16 image tokens
    backbone = LlavaBackbone(
        config=config, tokenizer=str(tokenizer_dir), template="plain_chat", seed=0, attn_implementation=attn_implementation
    )
    backbone.build()
    return backbone.eval()


def _inputs(backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows with an image at different places, one text-only row; no padding."""
    n, image = backbone.num_image_tokens, backbone.image_token_id
    rows = [[5, 6] + [image] * n + [7, 8, 9], [10] + [image] * n + [11, 12, 13, 14], list(range(5, 5 + n + 5))]
    ids = torch.tensor(rows)
    with torch.no_grad():
        embeds = embed_multimodal(backbone, ids, random_images(2, size=64))
    return ids, embeds, ids == image


def test_kept_count_truncates_as_fastv():
    totals = torch.tensor([0, 1, 10, 16, 576, 7])
    for ratio in (0.0, 0.3, 0.5, 0.75, 0.9):
        # FastV's KV-cache code: topk(int(576 * keep)), the kept fraction written as a decimal
        keep = round(1 - ratio, 9)
        expected = [int(n * keep) for n in totals.tolist()]
        assert kept_count(totals, ratio).tolist() == expected
    assert kept_count(torch.tensor([576]), 0.3).tolist() == [403]  # 403.2 (ceil kept 404)
    assert kept_count(torch.tensor([10]), 0.9).tolist() == [1]  # (1 - 0.9) * 10 = 0.9999999999999998


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75])
def test_fastv_keeps_the_most_attended_image_tokens(tokenizer_dir, ratio):
    backbone = _backbone(tokenizer_dir, "eager")
    ids, embeds, image_mask = _inputs(backbone)
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        # independent: transformers' eager attention maps of layer K - 1, mean over heads, last query row
        # (FastV's modeling_llama.py: torch.mean(attention, dim=1)[0][-1])
        reference = backbone.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True
        )
        received = reference.attentions[K - 1].mean(1)[:, -1]  # [B, T]
        averaged = reference.attentions[K - 1].mean(1).mean(1)  # [B, T]: the mean over queries, another rule
        layout = TokenLayout(image_mask)
        hidden, _ = Engine(backbone)(embeds, mask, positions, gated=False, token_selector=FastV(K, ratio), layout=layout)
    n = backbone.num_image_tokens
    keep_n = int(n * round(1 - ratio, 9))
    for row in range(3):
        images = image_mask[row].nonzero().flatten()
        kept = layout.keep[row]
        assert bool(kept[~image_mask[row]].all())  # every text token stays
        assert int(kept[image_mask[row]].sum()) == (keep_n if images.numel() else 0)
        if images.numel():
            best = images[received[row, images].argsort(descending=True)[:keep_n]]
            assert sorted(kept.nonzero().flatten()[image_mask[row][kept]].tolist()) == sorted(best.tolist())
            other = images[averaged[row, images].argsort(descending=True)[:keep_n]]
            assert ratio == 0.75 or sorted(other.tolist()) != sorted(best.tolist())  # the rules differ here
    assert hidden.shape[1] == ids.shape[1] if keep_n == n else hidden.shape[1] == int(layout.keep.sum(-1).max())
    # the kept positions, in order, right-aligned; text ids follow their tokens
    for row in range(3):
        real = layout.source_index[row] >= 0
        assert layout.source_index[row][real].tolist() == layout.keep[row].nonzero().flatten().tolist()
        assert bool(real[-int(real.sum()) :].all())


def test_padded_rows_rank_by_their_own_last_token(tokenizer_dir):
    """Right-padded (training) and left-padded (generation) rows: each row ranks by its own last real query,
    as if it ran alone without padding (transformers' eager maps of each row alone)."""
    backbone = _backbone(tokenizer_dir, "eager")
    n, image, pad = backbone.num_image_tokens, backbone.image_token_id, backbone.tokenizer.pad_token_id
    rows = [[5, 6] + [image] * n + [7, 8, 9, 10, 11], [10] + [image] * n + [11]]
    images = random_images(2, size=64)
    for side in ("right", "left"):
        width = max(len(r) for r in rows)
        padded = [r + [pad] * (width - len(r)) if side == "right" else [pad] * (width - len(r)) + r for r in rows]
        ids = torch.tensor(padded)
        mask = (ids != pad).long()
        with torch.no_grad():
            embeds = embed_multimodal(backbone, ids, images)
            layout = TokenLayout(ids == image)
            Engine(backbone)(embeds, mask, position_ids_from_mask(mask), gated=False, token_selector=FastV(K, 0.5), layout=layout)
        for row, tokens in enumerate(rows):
            alone = torch.tensor([tokens])
            with torch.no_grad():
                alone_embeds = embed_multimodal(backbone, alone, images[row : row + 1])
                maps = backbone.model.model.language_model(
                    inputs_embeds=alone_embeds, attention_mask=torch.ones_like(alone), output_attentions=True
                ).attentions[K - 1]
            received = maps.mean(1)[0, -1]  # [T]
            where = (alone[0] == image).nonzero().flatten()
            best = where[received[where].argsort(descending=True)[: n // 2]]
            offset = 0 if side == "right" else width - len(tokens)
            kept = (layout.keep[row] & layout.image_mask[row]).nonzero().flatten() - offset
            assert sorted(kept.tolist()) == sorted(best.tolist()), (side, row)


def test_no_drop_is_the_plain_model(tokenizer_dir):
    backbone = _backbone(tokenizer_dir)
    ids, embeds, image_mask = _inputs(backbone)
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    engine = Engine(backbone)
    with torch.no_grad():
        plain, _ = engine(embeds, mask, positions, gated=False)
        nothing, _ = engine(embeds, mask, positions, gated=False, token_selector=FastV(K, 0.0), layout=TokenLayout(image_mask))
        dropped, _ = engine(embeds, mask, positions, gated=False, token_selector=FastV(K, 0.5), layout=TokenLayout(image_mask))
    torch.testing.assert_close(nothing, plain, atol=1e-5, rtol=1e-5)
    # the text-only row lost nothing (so the batch keeps its width) and its states are unchanged
    assert dropped.shape[1] == plain.shape[1]
    torch.testing.assert_close(dropped[2], plain[2], atol=1e-5, rtol=1e-5)
    # the image rows changed after the drop
    assert (dropped[0, -1] - plain[0, -1]).abs().max() > 1e-4


def test_cache_after_the_drop_holds_only_the_kept_tokens(tokenizer_dir):
    backbone = _backbone(tokenizer_dir)
    ids, embeds, image_mask = _inputs(backbone)
    mask = torch.ones_like(ids)
    cache = PlanCache()
    layout = TokenLayout(image_mask)
    with torch.no_grad():
        Engine(backbone)(embeds, mask, position_ids_from_mask(mask), gated=False, cache=cache, token_selector=FastV(K, 0.5), layout=layout)
    kept = int(layout.keep.sum(-1).max())
    assert [group[0].keys.shape[2] for group in cache.groups] == [ids.shape[1]] * K + [kept] * (4 - K)
    assert cache.selected_from == K and cache.selected_attention_mask.sum(-1).tolist() == layout.keep.sum(-1).tolist()


def test_layer_index_must_leave_layers_after_it(tokenizer_dir):
    backbone = _backbone(tokenizer_dir)
    ids, embeds, image_mask = _inputs(backbone)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="layer_index=4 must be in"):
        Engine(backbone)(embeds, mask, position_ids_from_mask(mask), token_selector=FastV(4), layout=TokenLayout(image_mask))
    with pytest.raises(ValueError, match="pass `layout`"):
        Engine(backbone)(embeds, mask, position_ids_from_mask(mask), token_selector=FastV(2))
    with pytest.raises(ValueError, match="drop_ratio"):
        FastV(2, 1.0)
