"""Full, Random and Static baselines."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.schedulers import (
    FullScheduler,
    HeadScheduler,
    LayerScheduler,
    RandomScheduler,
    StaticScheduler,
)

GQA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=128, vocab_size=100)


def configured(scheduler):
    scheduler.configure(GQA)
    return scheduler


def test_none_reads_a_latency_token_or_has_parameters() -> None:
    for scheduler in (FullScheduler(3), RandomScheduler(3), StaticScheduler(3)):
        configured(scheduler)
        assert not scheduler.needs_latency_token
        assert scheduler.latency_token(torch.ones(2), torch.tensor([4, 4])) is None
        assert len(list(scheduler.parameters())) == 0


def test_full_runs_everything_for_any_budget() -> None:
    scheduler = configured(FullScheduler(3))
    budgets, lengths = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([5, 9, 12])
    scheduler.check_budgets(budgets, lengths)  # no error, even below the minimum
    plan = scheduler(None, budgets, lengths)
    assert bool((plan.layer_mask == 1).all()) and plan.layer_mask.shape == (3, 5)
    assert plan.units.tolist() == [5, 5, 5]
    expected = [float(scheduler.cost.full_flops(n)) for n in (5, 9, 12)]
    assert scheduler.cost.plan_flops(plan, lengths).tolist() == expected


@pytest.mark.parametrize("rule", ["release", "flops"])
def test_random_and_static_keep_the_layer_scheduler_k(rule) -> None:
    layer = configured(LayerScheduler(3, budget_rule=rule))
    budgets = torch.tensor([layer.cost.min_budget(10), 0.7, 0.8, 0.9, 1.0])
    lengths = torch.full((5,), 10)
    k = layer.units_for_budget(budgets, lengths)
    assert k.tolist() == sorted(set(k.tolist())) and len(k) == 5  # all different
    for scheduler in (configured(RandomScheduler(3, budget_rule=rule)), configured(StaticScheduler(3, budget_rule=rule))):
        plan = scheduler(None, budgets, lengths)
        assert plan.layer_mask.sum(-1).tolist() == k.float().tolist()
        assert torch.equal(plan.units, k)
        flops = scheduler.cost.plan_flops(plan, lengths)
        if rule == "flops":
            assert bool((flops <= budgets.double() * scheduler.cost.full_flops(10)).all())


def test_static_keeps_the_first_layers() -> None:
    scheduler = configured(StaticScheduler(3))
    budgets = torch.tensor([0.7, 0.9])
    plan = scheduler(None, budgets, torch.tensor([10, 10]))
    for row, k in enumerate(plan.units.tolist()):
        assert plan.layer_mask[row].tolist() == [1.0] * k + [0.0] * (5 - k)


def test_random_is_uniform_per_example_and_seeded() -> None:
    budgets, lengths = torch.full((400,), 0.75), torch.full((400,), 10)
    first = configured(RandomScheduler(3, seed=7))(None, budgets, lengths).layer_mask
    again = configured(RandomScheduler(3, seed=7))(None, budgets, lengths).layer_mask
    other = configured(RandomScheduler(3, seed=8))(None, budgets, lengths).layer_mask
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) > 5  # examples get different layers
    frequency = first.mean(0)  # each layer equally likely: k / L_sched
    k = first[0].sum()
    assert bool(((frequency - k / 5).abs() < 0.1).all())


@pytest.mark.parametrize("cls", [RandomScheduler, StaticScheduler])
def test_budget_errors(cls) -> None:
    scheduler = configured(cls(3, budget_rule="flops"))
    with pytest.raises(ValueError, match="admissible range"):
        scheduler(None, torch.tensor([0.2]), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        configured(cls(3))(None, torch.tensor([-0.1]), torch.tensor([10]))


def test_a_baseline_can_insert_the_layer_schedulers_latency_token() -> None:
    layer = configured(LayerScheduler(3))
    budgets, lengths = torch.tensor([0.7, 1.0]), torch.tensor([10, 10])
    for scheduler in (configured(FullScheduler(3, insert_latency_token=True)), configured(StaticScheduler(3, insert_latency_token=True))):
        assert scheduler.needs_latency_token
        scheduler.latency_encoder.load_state_dict(layer.latency_encoder.state_dict())
        assert {k for k in scheduler.state_dict()} == {k for k in layer.state_dict() if k.startswith("latency_encoder.")}
    static = configured(StaticScheduler(3, insert_latency_token=True))
    static.latency_encoder.load_state_dict(layer.latency_encoder.state_dict())
    assert torch.equal(static.latency_token(budgets, lengths), layer.latency_token(budgets, lengths))


def test_a_baseline_encodes_the_budget_in_the_units_of_the_scheduler_it_was_trained_with() -> None:
    head = configured(HeadScheduler(3, rank=4, budget_rule="flops"))  # 5 layers x 2 units of 4 heads: U = 10
    budgets, lengths = torch.tensor([1.0, 0.9, 0.75, 0.62]), torch.tensor([10, 10, 12, 16])
    static = configured(StaticScheduler(3, insert_latency_token=True, budget_rule="flops"))
    own = static.latency_value(budgets, lengths)  # layers: k / (5 + 1)
    static.encode_budget_like(HeadScheduler(3, rank=4, budget_rule="flops"))
    static.latency_encoder.load_state_dict(head.latency_encoder.state_dict())
    value = static.latency_value(budgets, lengths)
    units = head.units_for_budget(budgets, lengths)
    torch.testing.assert_close(value, units.float() / 11, rtol=0, atol=0)  # independent: k head units / (U + 1)
    assert not torch.equal(value, own)  # at 1.0: 10 / 11 against 5 / 6
    assert torch.equal(static.latency_token(budgets, lengths), head.latency_token(budgets, lengths))
    assert set(static.state_dict()) == {k for k in head.state_dict() if k.startswith("latency_encoder.")}  # no plan head
    # the plan is still the baseline's own: whole layers, as many as the budget's FLOPs allow
    assert static(None, budgets, lengths).layer_mask.sum(-1).tolist() == static.units_for_budget(budgets, lengths).tolist()
    # a budget this plan meets (1 always-run layer) but the trained scheduler (3) never saw: named as such
    low = configured(StaticScheduler(1, insert_latency_token=True, budget_rule="flops"))
    low.encode_budget_like(HeadScheduler(3, rank=4, budget_rule="flops"))
    assert low(None, torch.tensor([0.3]), torch.tensor([10])).layer_mask.sum() > 0
    with pytest.raises(ValueError, match=r"checkpoint's HeadScheduler \(3 always-run layers\) did, .*: budget 0\.3 .* admissible range"):
        low.latency_token(torch.tensor([0.3]), torch.tensor([10]))
