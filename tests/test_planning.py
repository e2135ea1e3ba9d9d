"""Planner: the one public way from a batch and budgets to the engine's inputs, and back to FLOPs."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.engine import PlanRequest
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.planning import PlanInputs, Planner
from adaptive_mllm.schedulers import LayerScheduler, StaticScheduler
from adaptive_mllm.schedulers.plan import ExecutionPlan
from tests.conftest import make_backbone
from tests.test_module import ANSWERS, QUESTIONS, _batch


def _model(tokenizer_dir, scheduler) -> AdaptiveMLLM:
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), scheduler)
    model.configure_model()
    return model.eval()


def _prepared_prompts(model: AdaptiveMLLM, budgets: list[float]):
    """The batch and what the planner prepares for generating its answers under ``budgets``."""
    batch = _batch(model, QUESTIONS, ANSWERS)
    planner = model.planner
    inputs = planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    return batch, planner.prepare(inputs, torch.tensor(budgets))


def test_generation_puts_the_latency_token_after_the_prompt_and_defers_the_plan(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    batch, prepared = _prepared_prompts(model, [1.0, 0.8, 0.6])
    width = batch["prompt_ids"].shape[1]
    assert prepared.embeds.shape[1] == width + 1 and prepared.latency_positions.tolist() == [width] * 3
    # the token is the scheduler's embedding of each budget, at the last column
    token = model.scheduler.latency_token(torch.tensor([1.0, 0.8, 0.6]), prepared.inputs.seq_lens)
    torch.testing.assert_close(prepared.embeds[:, -1], token)
    # left-padded prompts: the token's position id is the prompt's real length (positions count real tokens)
    assert prepared.position_ids[:, -1].tolist() == batch["prompt_attention_mask"].sum(-1).tolist()
    assert prepared.inputs.seq_lens.tolist() == (batch["prompt_attention_mask"].sum(-1) + 1).tolist()
    assert isinstance(prepared.plan, PlanRequest) and prepared.plan.num_prefix_layers == 2


def test_training_puts_the_latency_token_at_the_end_of_each_prompt(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    batch = _batch(model, QUESTIONS, ANSWERS)
    planner = model.planner
    inputs = planner.embed(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    prepared = planner.prepare(inputs, torch.tensor([0.9, 0.9, 0.9]), batch["prompt_lengths"])
    assert prepared.latency_positions.tolist() == batch["prompt_lengths"].tolist()
    for row, at in enumerate(batch["prompt_lengths"].tolist()):
        assert prepared.labels[row, at].item() == -100  # the token is never a target
        assert prepared.labels[row, at + 1 :].tolist() == batch["labels"][row, at:].tolist()  # the answer moved by one


def test_a_rule_scheduler_without_token_gets_its_plan_at_once(tokenizer_dir):
    model = _model(tokenizer_dir, StaticScheduler(num_prefix_layers=2))
    batch, prepared = _prepared_prompts(model, [1.0, 1.0, 1.0])
    assert not model.planner.uses_latency_token and prepared.latency_positions is None
    assert prepared.embeds.shape[1] == batch["prompt_ids"].shape[1]
    assert isinstance(prepared.plan, ExecutionPlan) and bool((prepared.plan.layer_mask == 1).all())


def test_flops_fraction_is_one_for_the_full_model_and_the_ratio_otherwise(tokenizer_dir):
    model = _model(tokenizer_dir, StaticScheduler(num_prefix_layers=2))
    planner = model.planner
    sizes = PlanInputs(torch.tensor([1.0, 0.5]), torch.tensor([20, 30]))
    assert planner.flops_fraction(None, sizes).tolist() == [1.0, 1.0]
    half = ExecutionPlan(2, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    cost = model.scheduler.cost
    # by hand: 4 of the 6 equal layers run (2 prefix + 2 scheduled), the LM head always (cost.py's rule)
    head = cost.lm_head_flops()
    expected = [(4 * cost.layer_flops(n) + head) / (6 * cost.layer_flops(n) + head) for n in (20, 30)]
    assert planner.flops_fraction(half, sizes).tolist() == pytest.approx(expected)


def test_prepare_without_budgets_needs_a_range_to_draw_from(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    batch = _batch(model, QUESTIONS, ANSWERS)
    planner = Planner(model.backbone, model.scheduler, None)
    inputs = planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    with pytest.raises(ValueError, match="draw_range"):
        planner.prepare(inputs, None)
    drawn = planner.prepare(inputs, None, draw_range=(1.0, 1.0)).inputs.budgets
    assert drawn.tolist() == pytest.approx([1.0, 1.0, 1.0])
