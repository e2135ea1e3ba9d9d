"""The engine against transformers, and its two ways of honouring a plan against each other."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.engine import Engine
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import embed_multimodal, position_ids_from_mask
from adaptive_mllm.schedulers.plan import ExecutionPlan
from tests.conftest import random_images

PREFIX = 1


def _prompt(backbone, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(backbone.tokenizer), (batch, length), generator=generator)
    ids[ids == backbone.image_token_id] = 5
    return ids


def _left_padded(backbone, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(lengths)
    ids = _prompt(backbone, len(lengths), longest, seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : longest - length] = backbone.tokenizer.pad_token_id
        mask[row, : longest - length] = 0
    return ids, mask


def _layer_plan(batch: int, layers: int, seed: int) -> ExecutionPlan:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, layers - PREFIX, generator=generator) > 0.5).float()
    mask[0] = 1.0  # one example keeps everything, one nothing: the edge cases
    mask[-1] = 0.0
    return ExecutionPlan(PREFIX, mask)


def _head_plan(backbone, batch: int, seed: int) -> ExecutionPlan:
    shape = backbone.shape
    generator = torch.Generator().manual_seed(seed)
    scheduled = shape.num_layers - PREFIX
    attention = (torch.rand(batch, scheduled, shape.num_kv_heads, generator=generator) > 0.5).float()
    mlp = (torch.rand(batch, scheduled, shape.num_heads, generator=generator) > 0.5).float()
    attention[0, 0] = 0.0  # a layer with MLP groups only
    mlp[0, 0] = 1.0
    layer = ((attention.sum(-1) + mlp.sum(-1)) > 0).float()
    return ExecutionPlan(PREFIX, layer, attention, mlp)


def _logits(backbone, hidden):
    return backbone.lm_head(backbone.final_norm(hidden))


@pytest.mark.parametrize("fixture", ["backbone", "gqa_backbone"])
def test_full_model_matches_transformers(fixture, request):
    backbone = request.getfixturevalue(fixture)
    prompt = backbone.chat_template.encode_prompt(
        ["<image>\nWhat colour is the red circle ?"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    ids = torch.tensor([prompt, prompt])
    mask = torch.ones_like(ids)
    images = random_images(2)
    with torch.no_grad():
        reference = backbone.model(input_ids=ids, pixel_values=images, attention_mask=mask).logits
        embeds = embed_multimodal(backbone, ids, images)
        engine = Engine(backbone)
        skipping, _ = engine(embeds, mask, position_ids_from_mask(mask), gated=False)
        full_plan = ExecutionPlan.full(2, backbone.shape.num_layers, PREFIX)
        gated, _ = engine(embeds, mask, position_ids_from_mask(mask), full_plan, gated=True)
    torch.testing.assert_close(_logits(backbone, skipping), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(backbone, gated), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["backbone", "gqa_backbone"])
@pytest.mark.parametrize("level", ["layer", "head"])
def test_gated_equals_skipping(fixture, level, request):
    backbone = request.getfixturevalue(fixture)
    ids, mask = _left_padded(backbone, [9, 6, 9, 4, 7], seed=1)
    plan = _layer_plan(5, backbone.shape.num_layers, seed=2) if level == "layer" else _head_plan(backbone, 5, seed=2)
    engine = Engine(backbone)
    with torch.no_grad():
        embeds = backbone.embed(ids)
        positions = position_ids_from_mask(mask)
        gated, _ = engine(embeds, mask, positions, plan, gated=True)
        skipping, _ = engine(embeds, mask, positions, plan, gated=False)
    real = mask.bool()
    torch.testing.assert_close(skipping[real], gated[real], atol=1e-5, rtol=1e-5)
    # the plan really changes the result: it is not the full model
    full, _ = engine(embeds, mask, positions, gated=False)
    assert (full[real] - gated[real]).abs().max() > 1e-3


@pytest.mark.parametrize("level", ["layer", "head"])
def test_mixed_batch_equals_each_alone(gqa_backbone, level):
    backbone = gqa_backbone
    lengths = [8, 5, 8, 3]
    ids, mask = _left_padded(backbone, lengths, seed=3)
    plan = _layer_plan(4, backbone.shape.num_layers, seed=4) if level == "layer" else _head_plan(backbone, 4, seed=4)
    engine = Engine(backbone)
    with torch.no_grad():
        together = greedy_generate(engine, backbone.embed(ids), mask, 6, [], plan)
        for row, length in enumerate(lengths):
            alone_ids = ids[row : row + 1, -length:]
            alone = greedy_generate(
                engine, backbone.embed(alone_ids), torch.ones_like(alone_ids), 6, [], plan.select(torch.tensor([row]))
            )
            assert alone.tokens[0] == together.tokens[row]
        # and the hidden states agree, not only the argmax
        batched, _ = engine(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False)
        for row, length in enumerate(lengths):
            alone_ids = ids[row : row + 1, -length:]
            alone_mask = torch.ones_like(alone_ids)
            single, _ = engine(backbone.embed(alone_ids), alone_mask, position_ids_from_mask(alone_mask), plan.select(torch.tensor([row])), gated=False)
            torch.testing.assert_close(batched[row, -length:], single[0], atol=1e-5, rtol=1e-5)


def test_each_row_stops_at_its_own_cap_and_the_others_are_unchanged(gqa_backbone):
    backbone = gqa_backbone
    ids, mask = _left_padded(backbone, [7, 4, 6], seed=5)
    engine = Engine(backbone)
    with torch.no_grad():
        full = greedy_generate(engine, backbone.embed(ids), mask, 6, [])  # no stop token: every row takes 6
        capped = greedy_generate(engine, backbone.embed(ids), mask, 6, [], row_max_new_tokens=[2, 6, 1])
        assert [len(tokens) for tokens in capped.tokens] == [2, 6, 1]
        assert capped.tokens == [full.tokens[0][:2], full.tokens[1], full.tokens[2][:1]]
        short = greedy_generate(engine, backbone.embed(ids), mask, 6, [], row_max_new_tokens=[2, 1, 2])
        assert short.decode_steps == 1  # the batch stops once every row reached its cap
        for bad in ([0, 6, 6], [7, 6, 6], [6, 6]):
            with pytest.raises(ValueError, match="row_max_new_tokens"):
                greedy_generate(engine, backbone.embed(ids), mask, 6, [], row_max_new_tokens=bad)


def test_a_capped_row_may_decode_on_past_the_maximum_length(gqa_backbone):
    """The server admits a prompt whose own answer cap fits the model's maximum length; batched beside a longer
    allowed answer, that row runs on past the maximum length (RoPE positions are computed), and neither row's
    answer changes."""
    backbone = gqa_backbone
    longest = backbone.max_length - 2  # + 1 answer token fits; + 6 does not
    ids, mask = _left_padded(backbone, [longest, 5], seed=3)
    engine = Engine(backbone)
    with torch.no_grad():
        together = greedy_generate(engine, backbone.embed(ids), mask, 6, [], row_max_new_tokens=[1, 6])
        assert together.decode_steps == 5 and ids.shape[1] + 5 > backbone.max_length
        for row, (length, cap) in enumerate([(longest, 1), (5, 6)]):
            alone_ids = ids[row : row + 1, -length:]
            alone = greedy_generate(engine, backbone.embed(alone_ids), torch.ones_like(alone_ids), cap, [])
            assert alone.tokens[0] == together.tokens[row]


def assert_cached_generation_equals_uncached(backbone, level: str, steps: int = 5) -> None:
    """Greedy generation with the KV cache, against recomputing every step from scratch (no cache) under
    the same plan (``level``: none / layer / head)."""
    ids, mask = _left_padded(backbone, [7, 4, 6], seed=5)
    plan = {"none": None, "layer": _layer_plan(3, 4, seed=6), "head": _head_plan(backbone, 3, seed=6)}[level]
    engine = Engine(backbone)
    with torch.no_grad():
        generated = greedy_generate(engine, backbone.embed(ids), mask, steps, [], plan)
        assert all(len(tokens) == steps for tokens in generated.tokens)
        sequence, sequence_mask = ids, mask
        for step in range(steps):
            hidden, _ = engine(backbone.embed(sequence), sequence_mask, position_ids_from_mask(sequence_mask), plan, gated=False)
            next_token = _logits(backbone, hidden[:, -1]).argmax(-1)
            assert next_token.tolist() == [tokens[step] for tokens in generated.tokens]
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(next_token[:, None])], dim=1)


@pytest.mark.parametrize("level", ["none", "layer", "head"])
def test_cached_generation_equals_uncached(gqa_backbone, level):
    assert_cached_generation_equals_uncached(gqa_backbone, level)


def test_kv_cache_stores_only_what_the_plan_runs(gqa_backbone):
    from adaptive_mllm.engine import PlanCache

    backbone = gqa_backbone
    ids, mask = _left_padded(backbone, [5, 5], seed=7)
    scheduled = backbone.shape.num_layers - PREFIX
    layer_mask = torch.ones(2, scheduled)
    layer_mask[:, 0] = 0.0  # layer 1 is off for both: nothing cached
    attention = torch.ones(2, scheduled, backbone.shape.num_kv_heads)
    attention[:, 1, 0] = 0.0  # layer 2 keeps one of two kv heads
    mlp = torch.ones(2, scheduled, backbone.shape.num_heads)
    attention[:, 0] = 0.0
    mlp[:, 0] = 0.0
    plan = ExecutionPlan(PREFIX, layer_mask, attention, mlp)
    cache = PlanCache()
    with torch.no_grad():
        Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False, cache=cache)
    assert cache.groups[1] == []
    assert cache.groups[2][0].keys.shape[1] == 1
    assert cache.groups[3][0].keys.shape[1] == backbone.shape.num_kv_heads
    # a layer that keeps every group runs with its own weights: no sliced copy is made
    assert cache.groups[2][0].weights is not None
    assert cache.groups[3][0].weights is None


def test_rows_that_keep_different_heads_decode_together(gqa_backbone):
    """Prefill runs one sliced pass per head pattern; for decoding, a layer whose rows differ keeps one
    group with full-head keys / values and each row's gates, while rows that agree stay sliced."""
    from adaptive_mllm.engine import PlanCache

    backbone = gqa_backbone
    shape = backbone.shape
    ids, mask = _left_padded(backbone, [5, 5], seed=9)
    scheduled = shape.num_layers - PREFIX
    attention = torch.ones(2, scheduled, shape.num_kv_heads)
    mlp = torch.ones(2, scheduled, shape.num_heads)
    attention[:, 0, 0] = 0.0  # scheduled layer 0: both rows drop kv group 0 -> stays one sliced group
    attention[0, 1, 0] = 0.0  # scheduled layer 1: the rows differ -> merged for decoding
    attention[1, 1, 1] = 0.0
    plan = ExecutionPlan(PREFIX, torch.ones(2, scheduled), attention, mlp)
    cache = PlanCache()
    with torch.no_grad():
        Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False, cache=cache)
    (agreeing,) = cache.groups[PREFIX]
    assert agreeing.weights is not None and agreeing.head_gate is None
    assert agreeing.keys.shape[1] == shape.num_kv_heads - 1
    (merged,) = cache.groups[PREFIX + 1]
    assert merged.weights is None and merged.rows is None
    assert merged.keys.shape == (2, shape.num_kv_heads, 5, shape.head_dim)
    assert torch.equal(merged.head_gate, attention[:, 1].repeat_interleave(shape.queries_per_kv, dim=1))
    assert merged.keys[0, 0].abs().sum() == 0 and merged.keys[1, 1].abs().sum() == 0  # dropped heads: zeros
    assert merged.keys[0, 1].abs().sum() > 0 and merged.keys[1, 0].abs().sum() > 0
