"""AdaLLaVA-L: k whole layers per example, within budget, with gradients to the scheduler."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.schedulers import ExecutionPlan, LayerScheduler

MHA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128, vocab_size=100)
GQA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=128, vocab_size=100)


def configured(shape: DecoderShape = MHA, prefix: int = 3, budget_rule: str = "release") -> LayerScheduler:
    torch.manual_seed(0)
    scheduler = LayerScheduler(num_prefix_layers=prefix, tau=5.0, budget_rule=budget_rule)
    scheduler.configure(shape)
    return scheduler


def test_configure_creates_parameters_once() -> None:
    scheduler = LayerScheduler(num_prefix_layers=3)
    assert len(list(scheduler.parameters())) == 0
    with pytest.raises(RuntimeError, match="configure"):
        _ = scheduler.cost
    scheduler.configure(MHA)
    assert scheduler.head.out_features == 5 and scheduler.head.in_features == 64
    assert scheduler.num_units == 5 and scheduler.needs_latency_token
    parameters = [p.clone() for p in scheduler.parameters()]
    scheduler.configure(MHA)  # idempotent: the same parameters survive
    assert all(torch.equal(a, b) for a, b in zip(parameters, scheduler.parameters(), strict=True))
    with pytest.raises(ValueError, match="already configured"):
        scheduler.configure(GQA)
    with pytest.raises(ValueError, match="num_prefix_layers"):
        LayerScheduler(num_prefix_layers=8).configure(MHA)


def test_state_dict_round_trip() -> None:
    source = configured()
    target = LayerScheduler(num_prefix_layers=3)
    target.configure(MHA)
    target.load_state_dict(source.state_dict())
    hidden, budgets, lengths = torch.randn(3, 64), torch.tensor([0.7, 0.9, 1.0]), torch.tensor([5, 6, 7])
    source.eval(), target.eval()
    assert torch.equal(source(hidden, budgets, lengths).layer_mask, target(hidden, budgets, lengths).layer_mask)


@pytest.mark.parametrize("training", [True, False])
def test_exactly_k_layers_mixed_budgets(training: bool) -> None:
    scheduler = configured()
    scheduler.train(training)
    lengths = torch.tensor([12, 12, 12, 40, 40])
    budgets = torch.tensor([scheduler.cost.min_budget(12), 0.7, 1.0, 0.8, 0.95])
    plan = scheduler(torch.randn(5, 64), budgets, lengths)
    k = scheduler.units_for_budget(budgets, lengths)
    assert len(set(k.tolist())) >= 3  # the batch really mixes budgets
    assert isinstance(plan, ExecutionPlan) and not plan.is_head_level
    assert plan.layer_mask.shape == (5, 5) and plan.num_prefix_layers == 3
    assert bool(((plan.layer_mask == 0) | (plan.layer_mask == 1)).all())
    assert plan.layer_mask.sum(-1).tolist() == k.float().tolist()
    assert torch.equal(plan.units, k)


def test_eval_is_deterministic_and_follows_the_logits() -> None:
    scheduler = configured().eval()
    hidden = torch.randn(4, 64)
    budgets, lengths = torch.full((4,), 0.8), torch.full((4,), 20)
    first = scheduler(hidden, budgets, lengths).layer_mask
    torch.manual_seed(123)
    second = scheduler(hidden, budgets, lengths).layer_mask
    assert torch.equal(first, second)
    k = int(scheduler.units_for_budget(budgets[:1], lengths[:1])[0])
    top = scheduler.head(hidden).topk(k, dim=-1).indices
    assert torch.equal(first, torch.zeros(4, 5).scatter_(1, top, 1.0))


def test_gradients_reach_head_and_latency_encoder() -> None:
    scheduler = configured().train()
    budgets, lengths = torch.tensor([0.7, 0.9]), torch.tensor([10, 10])
    token = scheduler.latency_token(budgets, lengths)  # [B, hidden]
    hidden = token + torch.randn_like(token)  # stands in for the prefix layers
    plan = scheduler(hidden, budgets, lengths)
    weights = torch.randn(2, 5)
    (plan.layer_mask * weights).sum().backward()
    assert scheduler.head.weight.grad is not None and scheduler.head.weight.grad.abs().sum() > 0
    for name, parameter in scheduler.latency_encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("training", [True, False])
def test_budget_sweep_never_exceeds(shape: DecoderShape, training: bool) -> None:
    scheduler = configured(shape, budget_rule="flops")
    scheduler.train(training)
    cost = scheduler.cost
    for length in (1, 16, 300):
        minimum = cost.min_budget(length)
        budgets = torch.linspace(minimum, 1.0, 200, dtype=torch.float64)
        budgets[0] = minimum
        lengths = torch.full((200,), length)
        plan = scheduler(torch.randn(200, 64), budgets, lengths)
        flops = cost.plan_flops(plan, lengths)
        assert bool((flops <= budgets * cost.full_flops(length)).all())
        # maximal: one more layer would exceed the budget
        more = flops + cost.layer_flops(length)
        room = plan.units < scheduler.num_units
        assert bool((more[room] > budgets[room] * cost.full_flops(length)).all())
        assert int(plan.units[-1]) == scheduler.num_units and int(plan.units[0]) == 0


def test_budget_errors() -> None:
    with pytest.raises(ValueError, match=r"budget 1\.2 \(example 0\) is outside \[0, 1\] \(budget_rule 'release'\)"):
        configured()(torch.randn(1, 64), torch.tensor([1.2]), torch.tensor([9]))
    scheduler = configured(budget_rule="flops")
    with pytest.raises(ValueError, match=r"admissible range \[0\.\d+, 1\.0\] for sequence length 9"):
        scheduler.check_budgets(torch.tensor([0.9, 0.1]), torch.tensor([9, 9]))
    with pytest.raises(ValueError, match="admissible range"):
        scheduler(torch.randn(1, 64), torch.tensor([1.2]), torch.tensor([9]))
    with pytest.raises(ValueError, match="latency token"):
        scheduler(None, torch.tensor([1.0]), torch.tensor([9]))
    with pytest.raises(ValueError, match="tau"):
        LayerScheduler(2, tau=0.0)


def test_release_budget_rule_is_a_scheduler_option() -> None:
    """``budget_rule: release``: the release's floor(32 b) - 16 layers of a 32-layer LLM (LLaVA-1.5-7B's
    depth), FastV's dropped tokens ignored: 3 at 0.6 (the FLOPs rule: fewer), 0 below the prefix (no error)."""
    from adaptive_mllm.schedulers import HeadScheduler

    shape = DecoderShape(num_layers=32, hidden_size=64, num_heads=32, num_kv_heads=32, head_dim=2, intermediate_size=11008 // 64, vocab_size=32000)
    tokens = torch.tensor([[640] * 2 + [352] * 30] * 3)  # FastV K = 2, R = 0.5 on 576 image tokens
    lengths, budgets = torch.full((3,), 640), torch.tensor([0.6, 0.3, 1.0])
    release = LayerScheduler(num_prefix_layers=16, budget_rule="release")
    release.configure(shape)
    plan = release(torch.randn(3, 64), budgets, lengths, tokens)
    assert plan.layer_mask.sum(-1).tolist() == [3, 0, 16]
    flops = LayerScheduler(num_prefix_layers=16, budget_rule="flops")
    flops.configure(shape)
    assert int(flops.units_for_budget(budgets[:1], lengths[:1], tokens[:1])[0]) < 3  # 2 at 7B sizes: tests/test_cost.py
    with pytest.raises(ValueError, match="admissible range"):
        flops.check_budgets(budgets[1:2], lengths[1:2], tokens[1:2])
    head = HeadScheduler(num_prefix_layers=16, rank=8, budget_rule="release")  # 4 units per layer
    head.configure(shape)
    assert head.units_for_budget(torch.tensor([0.6, 0.85]), lengths[:2]).tolist() == [12, 44]  # floor(128 b) - 64
    # the latency token encodes k / (units + 1), as the release's latency_quantizing
    torch.testing.assert_close(release.latency_token(budgets, lengths, tokens), release.latency_encoder(torch.tensor([3, 0, 16]) / 17))
