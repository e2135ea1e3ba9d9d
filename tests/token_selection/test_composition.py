"""Every token selector with every scheduler: budgets hold with the tokens that really reach each
layer, the gated (training) and skipping (inference) paths agree, cached decoding equals uncached
recomputation of the same plan and the same kept tokens."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import position_ids_from_mask
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.schedulers import FullScheduler, HeadScheduler, LayerScheduler
from adaptive_mllm.token_selection import FastV, PruMerge, PruMergePlus, TokenLayout
from tests.conftest import random_images, tiny_config
from tests.test_module import ANSWERS, QUESTIONS, _batch

SELECTORS = {
    "prumerge": lambda: PruMerge(num_neighbours=4),
    "prumerge+": lambda: PruMergePlus(num_neighbours=4),
    "fastv": lambda: FastV(layer_index=2, drop_ratio=0.5),
}
SCHEDULERS = {
    "L": lambda: LayerScheduler(num_prefix_layers=2, budget_rule="flops"),  # a plan's FLOPs within its budget
    "H": lambda: HeadScheduler(num_prefix_layers=2, rank=2, budget_rule="flops"),
}


def _model(tokenizer_dir, scheduler, selector) -> AdaptiveMLLM:
    config = tiny_config(num_layers=6, num_kv_heads=2)
    config["vision"]["image_size"] = 64  # 16 image tokens
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat", seed=0)
    model = AdaptiveMLLM(backbone, scheduler, selector)
    model.configure_model()
    return model.eval()


def _images_batch(model) -> dict:
    batch = _batch(model, QUESTIONS, ANSWERS)
    batch["pixel_values"] = random_images(len(QUESTIONS), size=64, seed=1)
    return batch


def _prefill_inputs(model: AdaptiveMLLM, batch: dict, budget: float):
    """What ``AdaptiveMLLM.generate`` hands ``greedy_generate``, through the public planning API; the
    sizes the budget is measured against are recounted here by hand (prompt + latency token)."""
    planner = model.planner
    inputs = planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    size = inputs.embeds.shape[0]
    prepared = planner.prepare(inputs, torch.full((size,), budget))
    seq_lens = inputs.attention_mask.sum(-1) + 1
    layer_tokens = model.token_selector.layer_tokens(seq_lens, inputs.image_mask.sum(-1), model.backbone.shape.num_layers)
    assert torch.equal(prepared.inputs.seq_lens, seq_lens)
    assert (prepared.inputs.layer_tokens is None) == (layer_tokens is None)
    assert layer_tokens is None or torch.equal(prepared.inputs.layer_tokens, layer_tokens)
    assert prepared.latency_positions.tolist() == [inputs.embeds.shape[1]] * size  # after the prompt
    plan = prepared.plan
    return prepared.embeds, prepared.attention_mask, prepared.image_mask, prepared.latency_positions, plan, seq_lens, layer_tokens


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_plan_flops_stay_within_the_budget(tokenizer_dir, selector, scheduler):
    model = _model(tokenizer_dir, SCHEDULERS[scheduler](), SELECTORS[selector]())
    batch = _images_batch(model)
    cost = model.scheduler.cost
    seen_units = set()
    for budget in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6):
        embeds, mask, image_mask, latency, plan, seq_lens, layer_tokens = _prefill_inputs(model, batch, budget)
        if selector == "fastv":
            assert layer_tokens is not None and bool((layer_tokens[:, 2:] < layer_tokens[:, :2].min(-1, keepdim=True).values).all())
        result = greedy_generate(model.engine, embeds, mask, 1, [], plan, latency, model.token_selector, image_mask)
        flops = cost.plan_flops(result.plan, seq_lens, layer_tokens)
        tokens = [None] * len(seq_lens) if layer_tokens is None else layer_tokens.tolist()
        full = torch.tensor([cost.full_flops(int(n), t) for n, t in zip(seq_lens, tokens, strict=True)], dtype=torch.float64)
        assert bool((flops <= budget * full).all()), (budget, (flops / full).tolist())
        seen_units.update(result.plan.units.tolist())
        out = model.generate(batch, budget)
        assert out["flops_fraction"] <= budget + 1e-12
        if result.layout is not None:  # the engine dropped exactly what the cost model was told
            assert result.layout.keep.sum(-1).tolist() == (layer_tokens[:, -1]).tolist()
    assert len(seen_units) > 2  # the sweep really changes the plans


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("scheduler", ["none", "full", *SCHEDULERS])
def test_gated_forward_equals_skipping_forward(tokenizer_dir, selector, scheduler, monkeypatch):
    make = {"none": lambda: None, "full": lambda: FullScheduler(num_prefix_layers=0), **SCHEDULERS}[scheduler]
    model = _model(tokenizer_dir, make(), SELECTORS[selector]())
    batch = _images_batch(model)
    budgets = torch.tensor([0.9, 0.7, 1.0])
    with torch.no_grad():
        gated_logits, gated_labels = model(batch, budgets)
        run = model.engine.forward
        monkeypatch.setattr(model.engine, "forward", lambda *args, **kwargs: run(*args, **{**kwargs, "gated": False}))
        skipping_logits, skipping_labels = model(batch, budgets)
    assert torch.equal(gated_labels, skipping_labels)
    answer = gated_labels != IGNORE_INDEX
    assert int(answer.sum()) >= 3
    torch.testing.assert_close(skipping_logits[answer], gated_logits[answer], atol=1e-4, rtol=1e-4)
    # the answers' labels are those of the batch, in order, whatever the selector removed
    for row in range(3):
        original = batch["labels"][row]
        assert gated_labels[row][answer[row]].tolist() == original[original != IGNORE_INDEX].tolist()


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cached_generation_equals_uncached_recomputation(tokenizer_dir, selector, scheduler):
    model = _model(tokenizer_dir, SCHEDULERS[scheduler](), SELECTORS[selector]())
    batch = _images_batch(model)
    backbone, engine = model.backbone, model.engine
    steps = 4
    with torch.no_grad():
        embeds, mask, image_mask, latency, plan, _, _ = _prefill_inputs(model, batch, 0.75)
        result = greedy_generate(engine, embeds, mask, steps, [], plan, latency, model.token_selector, image_mask)
        assert all(len(tokens) == steps for tokens in result.tokens)
        keep = None if result.layout is None else result.layout.keep
        for step in range(steps):
            # from scratch, no cache, the prefill's plan and (FastV) the prefill's kept tokens
            layout = None if keep is None else TokenLayout(image_mask, keep=keep)
            hidden, _ = engine(
                embeds, mask, position_ids_from_mask(mask), result.plan, gated=False,
                token_selector=model.token_selector, layout=layout,
            )  # fmt: skip
            next_token = backbone.lm_head(backbone.final_norm(hidden[:, -1])).argmax(-1)
            assert next_token.tolist() == [tokens[step] for tokens in result.tokens]
            embeds = torch.cat([embeds, backbone.embed(next_token[:, None])], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            image_mask = torch.cat([image_mask, torch.zeros_like(image_mask[:, :1])], dim=1)
            keep = None if keep is None else torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)


def test_fastv_after_the_prefix_is_refused(tokenizer_dir):
    config = tiny_config(num_layers=6, num_kv_heads=2)
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat")
    with pytest.raises(ValueError, match="exceeds scheduler.num_prefix_layers"):
        AdaptiveMLLM(backbone, LayerScheduler(num_prefix_layers=2), FastV(layer_index=3))
    AdaptiveMLLM(backbone, FullScheduler(num_prefix_layers=0), FastV(layer_index=3))  # a full plan runs it anyway


@pytest.mark.parametrize("selector_name", list(SELECTORS))
def test_at_least_minimum_raises_a_budget_to_the_minimum_after_selection(tokenizer_dir, selector_name):
    """``generate(..., at_least_minimum=True)`` (the server's rule) runs a too-small budget at its example's
    minimum, counted on the tokens the selector lets through (recounted by hand here); unasked it is an error."""
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2, budget_rule="flops"), SELECTORS[selector_name]())
    batch = _images_batch(model)
    out = model.generate(batch, 0.0, at_least_minimum=True)
    inputs = model.planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    seq_lens = inputs.attention_mask.sum(-1) + 1  # + the latency token
    layer_tokens = model.token_selector.layer_tokens(seq_lens, inputs.image_mask.sum(-1), model.backbone.shape.num_layers)
    expected = [
        model.scheduler.cost.min_budget(int(n), None if layer_tokens is None else layer_tokens[row].tolist())
        for row, n in enumerate(seq_lens.tolist())
    ]
    assert out["budgets"] == pytest.approx(expected, abs=1e-6)
    assert out["units_per_example"] == [0.0] * len(expected)  # only the prefix and the LM head ran
    with pytest.raises(ValueError, match="outside the admissible range"):
        model.generate(batch, 0.0)


@pytest.mark.parametrize("selector", [*SELECTORS, "none"])
def test_flops_against_the_plain_model_count_every_image_token(tokenizer_dir, selector):
    # the paper's TFLOPs column: a selector's row against plain LLaVA (every image token, no selector), where
    # flops_fraction is against the full model with the same selection
    model = _model(tokenizer_dir, SCHEDULERS["L"](), SELECTORS[selector]() if selector != "none" else None)
    batch = _images_batch(model)
    cost = model.scheduler.cost
    plain = [cost.full_flops(int(n) + 1) for n in batch["prompt_attention_mask"].sum(-1)]  # prompt + latency token
    for budget in (1.0, 0.7):
        out = model.generate(batch, budget)
        if selector == "none":
            assert out["flops_vs_plain_fractions"] == pytest.approx(out["flops_fractions"], abs=1e-12)
            continue
        *_, seq_lens, layer_tokens = _prefill_inputs(model, batch, budget)
        tokens = [None] * len(seq_lens) if layer_tokens is None else layer_tokens.tolist()
        selected = [cost.full_flops(int(n), t) for n, t in zip(seq_lens, tokens, strict=True)]
        expected = [f * s / p for f, s, p in zip(out["flops_fractions"], selected, plain, strict=True)]
        assert out["flops_vs_plain_fractions"] == pytest.approx(expected, rel=1e-9)
        assert all(v < f for v, f in zip(out["flops_vs_plain_fractions"], out["flops_fractions"], strict=True))
        assert out["flops_vs_plain"] == pytest.approx(sum(expected) / len(expected), rel=1e-9)
