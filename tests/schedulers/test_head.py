"""AdaLLaVA-H: k units of (rank heads' attention + rank MLP groups), MHA and GQA, within budget."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.schedulers import HeadScheduler

MHA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128, vocab_size=100)
GQA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=128, vocab_size=100)
# UNEVEN: 100 MLP neurons in 8 groups (4 of 13, 4 of 12), as Vicuna-13B's 13824 in 40
UNEVEN = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=100, vocab_size=100)
CASES = [(MHA, 2), (MHA, 8), (GQA, 4), (GQA, 8), (UNEVEN, 2)]  # (shape, rank): 4, 1, 2, 1, 4 units per layer
IDS = ["mha-r2", "mha-r8", "gqa-r4", "gqa-r8", "uneven-r2"]


def configured(shape: DecoderShape, rank: int, prefix: int = 3, budget_rule: str = "release") -> HeadScheduler:
    torch.manual_seed(0)
    scheduler = HeadScheduler(num_prefix_layers=prefix, rank=rank, tau=5.0, budget_rule=budget_rule)
    scheduler.configure(shape)
    return scheduler


def units_per_layer_in(plan, scheduler: HeadScheduler) -> torch.Tensor:
    """[B, L_sched] units per layer read from the masks; both masks must agree."""
    attention = plan.head_mask.sum(-1) / scheduler.kv_groups_per_unit
    mlp = plan.mlp_mask.sum(-1) / scheduler.mlp_groups_per_unit
    assert torch.equal(attention, mlp)
    return attention


def test_rank_must_fit_the_heads() -> None:
    with pytest.raises(ValueError, match="multiple of queries per kv head"):
        HeadScheduler(2, rank=2).configure(GQA)  # 4 queries per kv head
    with pytest.raises(ValueError, match="must divide num_heads"):
        HeadScheduler(2, rank=3).configure(MHA)
    narrow = DecoderShape(num_layers=4, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=4, vocab_size=10)
    with pytest.raises(ValueError, match="MLP groups would be empty"):
        HeadScheduler(2, rank=2).configure(narrow)
    with pytest.raises(ValueError, match="rank"):
        HeadScheduler(2, rank=0)


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
def test_sizes(shape: DecoderShape, rank: int) -> None:
    scheduler = configured(shape, rank)
    assert scheduler.head.out_features == 5 * (shape.num_kv_heads + shape.num_heads)
    assert scheduler.units_per_layer == shape.num_heads // rank
    assert scheduler.kv_groups_per_unit * shape.queries_per_kv == rank
    assert scheduler.num_units == 5 * shape.num_heads // rank


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_exactly_k_units_mixed_budgets(shape: DecoderShape, rank: int, training: bool) -> None:
    scheduler = configured(shape, rank)
    scheduler.train(training)
    lengths = torch.tensor([12, 12, 12, 40, 40, 40])
    budgets = torch.tensor([scheduler.cost.min_budget(12), 0.62, 1.0, 0.75, 0.88, 0.97])
    plan = scheduler(torch.randn(6, 64), budgets, lengths)
    k = scheduler.units_for_budget(budgets, lengths)
    assert len(set(k.tolist())) >= 4
    assert plan.head_mask.shape == (6, 5, shape.num_kv_heads)
    assert plan.mlp_mask.shape == (6, 5, shape.num_heads)
    for mask in (plan.head_mask, plan.mlp_mask, plan.layer_mask):
        assert bool(((mask == 0) | (mask == 1)).all())
    per_layer = units_per_layer_in(plan, scheduler)
    assert per_layer.sum(-1).tolist() == k.float().tolist()
    assert torch.equal(per_layer, per_layer.round()) and bool((per_layer <= scheduler.units_per_layer).all())
    assert torch.equal(plan.layer_mask, (per_layer > 0).float())
    assert torch.equal(plan.units, k)


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
def test_all_units_is_the_full_model(shape: DecoderShape, rank: int) -> None:
    scheduler = configured(shape, rank).train()
    plan = scheduler(torch.randn(3, 64), torch.ones(3), torch.tensor([4, 8, 16]))
    assert bool((plan.head_mask == 1).all()) and bool((plan.mlp_mask == 1).all())
    assert bool((plan.layer_mask == 1).all())


def test_eval_is_deterministic() -> None:
    scheduler = configured(GQA, 4).eval()
    hidden, budgets, lengths = torch.randn(4, 64), torch.tensor([0.6, 0.7, 0.8, 0.9]), torch.full((4,), 30)
    first = scheduler(hidden, budgets, lengths)
    torch.manual_seed(99)
    second = scheduler(hidden, budgets, lengths)
    assert torch.equal(first.head_mask, second.head_mask)
    assert torch.equal(first.mlp_mask, second.mlp_mask)


def release_plan(logits: list[list[float]], k: int, kv: int, per_kv: int, per_mlp: int) -> tuple[list, list]:
    """The release's noiseless rule (scheduler_utils.py ``n_times_gumbel_softmax_head_version``), written
    from its description with plain lists: each unit, the largest logit among every still-unchosen element
    of every layer names the layer; in that layer the ``per_kv`` best unchosen attention logits and the
    ``per_mlp`` best unchosen MLP logits are taken. logits: [L_s][kv + G]. Returns 0/1 lists per layer."""
    taken = [[False] * len(row) for row in logits]
    for _ in range(k):
        best = max((value, layer) for layer, row in enumerate(logits) for element, value in enumerate(row) if not taken[layer][element])
        layer = best[1]
        row = logits[layer]
        for lo, hi, count in ((0, kv, per_kv), (kv, len(row), per_mlp)):
            free = sorted((e for e in range(lo, hi) if not taken[layer][e]), key=lambda e: -row[e])
            for element in free[:count]:
                taken[layer][element] = True
    attention = [[float(t) for t in row[:kv]] for row in taken]
    mlp = [[float(t) for t in row[kv:]] for row in taken]
    return attention, mlp


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
def test_eval_plans_follow_the_release_rule(shape: DecoderShape, rank: int) -> None:
    """Every unit count, 40 random latency states: the plan is the release's (one pick over all remaining
    element logits names the layer), not the layer with the best mean logit."""
    scheduler = configured(shape, rank).eval()
    kv = shape.num_kv_heads
    hidden = 3 * torch.randn(40, 64)
    logits = scheduler.head(hidden).view(40, 5, -1).tolist()
    lengths = torch.full((40,), 20)
    for units in range(scheduler.num_units + 1):
        budget = scheduler.cost.budget_for_units(units, 20, scheduler.units_per_layer)
        for grad in (True, False):  # the unit-by-unit loop and the ranked inference path
            with torch.set_grad_enabled(grad):
                plan = scheduler(hidden, torch.full((40,), budget, dtype=torch.float64), lengths)
            assert plan.units.tolist() == [units] * 40
            for row in range(40):
                attention, mlp = release_plan(logits[row], units, kv, scheduler.kv_groups_per_unit, scheduler.mlp_groups_per_unit)
                assert plan.head_mask[row].tolist() == attention, (units, row, grad)
                assert plan.mlp_mask[row].tolist() == mlp, (units, row, grad)


def set_logits(scheduler: HeadScheduler, logits: torch.Tensor) -> None:
    """Make the scheduler's head output ``logits`` [L_s, kv + G] whatever its input (weight 0, bias = logits)."""
    with torch.no_grad():
        scheduler.head.weight.zero_()
        scheduler.head.bias.copy_(logits.flatten())


def test_one_element_names_the_layer_not_the_mean() -> None:
    """Layer 0 holds one high logit among very low ones, layer 1 only medium ones: the release's pick over
    all elements takes layer 0 in evaluation, and in training takes layer l with probability
    ``sum_{e in l} softmax(logits)_e`` (Gumbel-max over the flattened logits): for layer 0,
    ``e^3 / (e^3 + 16 e) = 0.316``. The best-mean rule would take layer 1 (mean 1 against -9.2) almost always."""
    scheduler = configured(MHA, 8)  # one unit per layer: a unit is a whole layer
    logits = torch.full((5, 16), -10.0)
    logits[0, 3] = 3.0
    logits[1] = 1.0
    set_logits(scheduler, logits)
    cost = scheduler.cost
    one = (cost.fixed_flops(3) + 1.5 * cost.unit_flops(3, 1)[0]) / cost.full_flops(3)  # exactly one unit
    draws = 4000
    budgets, lengths = torch.full((draws,), one, dtype=torch.float64), torch.full((draws,), 3)
    with torch.no_grad():
        plan = scheduler.eval()(torch.zeros(1, 64), budgets[:1], lengths[:1])
    assert plan.layer_mask.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
    torch.manual_seed(0)
    plan = scheduler.train()(torch.zeros(draws, 64), budgets, lengths)
    frequency = plan.layer_mask.detach().mean(0)
    expected = math.exp(3) / (math.exp(3) + 16 * math.e)  # 0.3160
    assert abs(float(frequency[0]) - expected) < 0.03  # binomial sd 0.0074
    assert abs(float(frequency[1]) - (1 - expected)) < 0.03


def test_gradients_reach_head_and_latency_encoder() -> None:
    scheduler = configured(GQA, 4).train()
    budgets, lengths = torch.tensor([0.7, 0.85]), torch.tensor([10, 10])
    token = scheduler.latency_token(budgets, lengths)
    hidden = token + torch.randn_like(token)
    plan = scheduler(hidden, budgets, lengths)
    loss = (plan.head_mask * torch.randn_like(plan.head_mask)).sum()
    loss = loss + (plan.mlp_mask * torch.randn_like(plan.mlp_mask)).sum()
    loss.backward()
    grad = scheduler.head.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    for name, parameter in scheduler.latency_encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_budget_sweep_never_exceeds(shape: DecoderShape, rank: int, training: bool) -> None:
    scheduler = configured(shape, rank, budget_rule="flops")
    scheduler.train(training)
    cost = scheduler.cost
    for length in (1, 16, 300):
        minimum = cost.min_budget(length)
        budgets = torch.linspace(minimum, 1.0, 200, dtype=torch.float64)
        budgets[0] = minimum
        lengths = torch.full((200,), length)
        plan = scheduler(torch.randn(200, 64), budgets, lengths)
        flops = cost.plan_flops(plan, lengths)
        full = cost.full_flops(length)
        assert bool((flops <= budgets * full).all())
        if shape.intermediate_size % shape.num_heads == 0:  # equal units (uneven ones: tests/test_cost.py)
            unit = cost.unit_flops(length, scheduler.units_per_layer)[0]
            room = plan.units < scheduler.num_units
            assert bool((flops[room] + unit > budgets[room] * full).all())  # maximal
        assert int(plan.units[0]) == 0 and int(plan.units[-1]) == scheduler.num_units


def test_dropped_tokens_plans_stay_within_budget() -> None:
    """With cheaper late layers (tokens dropped after layer 4), whatever units the scheduler picks fit."""
    scheduler = configured(GQA, 4, prefix=2, budget_rule="flops").train()
    cost = scheduler.cost
    per_layer = torch.tensor([50] * 5 + [20] * 3)
    tokens = per_layer[None].expand(200, -1)
    lengths = torch.full((200,), 50)
    minimum = cost.min_budget(50, per_layer.tolist())
    budgets = torch.linspace(minimum, 1.0, 200, dtype=torch.float64)
    for _ in range(3):
        plan = scheduler(torch.randn(200, 64), budgets, lengths, tokens)
        flops = cost.plan_flops(plan, lengths, tokens)
        assert bool((flops <= budgets * cost.full_flops(50, per_layer.tolist())).all())


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
def test_inference_plan_equals_the_greedy_loop(shape: DecoderShape, rank: int, monkeypatch) -> None:
    """Without gradients, evaluation ranks every layer's offers at once; it must pick exactly what the
    unit-by-unit loop (run here with gradients on) picks, for every budget of a sweep."""
    scheduler = configured(shape, rank).eval()
    lengths = torch.full((300,), 40)
    budgets = torch.linspace(scheduler.cost.min_budget(40), 1.0, 300, dtype=torch.float64)
    hidden = 3 * torch.randn(300, 64)
    looped = scheduler(hidden, budgets, lengths)
    ranked_calls = []
    ranked_masks = scheduler._ranked_masks
    monkeypatch.setattr(scheduler, "_ranked_masks", lambda *args: ranked_calls.append(1) or ranked_masks(*args))
    with torch.no_grad():
        ranked = scheduler(hidden, budgets, lengths)
    assert ranked_calls == [1]  # the ranked path really ran
    assert len(set(looped.units.tolist())) == scheduler.num_units + 1  # every unit count was compared
    for name in ("head_mask", "mlp_mask", "layer_mask", "units"):
        assert torch.equal(getattr(ranked, name), getattr(looped, name).detach()), name


@pytest.mark.parametrize(("shape", "rank"), CASES, ids=IDS)
def test_tied_logits_give_one_plan_on_both_paths(shape: DecoderShape, rank: int, monkeypatch) -> None:
    """Ties (likely in float16 / bfloat16) keep the lower index on the loop path as on the ranked path, so a plan
    does not depend on whether gradients are on."""
    scheduler = configured(shape, rank).eval()
    with torch.no_grad():
        scheduler.head.weight.zero_()
        scheduler.head.bias.copy_(torch.randint(0, 3, scheduler.head.bias.shape).float())  # few values: many ties
    lengths = torch.full((60,), 40)
    budgets = torch.linspace(scheduler.cost.min_budget(40), 1.0, 60, dtype=torch.float64)
    hidden = torch.randn(60, 64)
    looped = scheduler(hidden, budgets, lengths)
    with torch.no_grad():
        ranked = scheduler(hidden, budgets, lengths)
    for name in ("head_mask", "mlp_mask", "layer_mask"):
        assert torch.equal(getattr(ranked, name), getattr(looped, name).detach()), name
