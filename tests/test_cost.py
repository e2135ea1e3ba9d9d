"""The analytic cost model: against torch's FlopCounterMode on real transformers Llama modules, and
the budget -> units rule (never over budget, and maximal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.cost import CostModel
from adaptive_mllm.schedulers.plan import ExecutionPlan

MHA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128, vocab_size=100)
GQA = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=128, vocab_size=100)


def llama(num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int) -> LlamaForCausalLM:
    # eager attention: on CPU, SDPA dispatches to a kernel FlopCounterMode does not count; eager runs the
    # two T x T matmuls, counted in full like SDPA's GPU kernels are
    config = LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=64,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=100,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def counted(model: LlamaForCausalLM, batch: int, length: int) -> FlopCounterMode:
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(ids, logits_to_keep=1)  # the LM head on the last position only
    assert out.logits.shape == (batch, 1, 100)
    return counter


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_full_flops_match_flop_counter(num_kv_heads: int, length: int) -> None:
    model = llama(4, 4, num_kv_heads, 16, 128)
    shape = DecoderShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, intermediate_size=128, vocab_size=100)
    cost = CostModel(shape, num_prefix_layers=2, budget_rule="flops")
    counter = counted(model, batch=2, length=length)
    assert counter.get_total_flops() == 2 * cost.full_flops(length)
    assert sum(counter.get_flop_counts()["LlamaForCausalLM.lm_head"].values()) == 2 * cost.lm_head_flops()


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("kv_kept", "mlp_kept"), [(1, 1), (1, 3), (2, 4), (2, 0)])
def test_partial_layer_matches_a_smaller_layer(num_kv_heads: int, kv_kept: int, mlp_kept: int) -> None:
    """A layer keeping ``kv_kept`` kv groups and ``mlp_kept`` of 4 MLP groups costs what a layer with
    exactly those sizes costs (what the engine's sliced weights compute)."""
    if kv_kept > num_kv_heads:
        pytest.skip("more groups than the layer has")
    shape = DecoderShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, intermediate_size=128, vocab_size=100)
    cost = CostModel(shape, num_prefix_layers=2, budget_rule="flops")
    q = shape.queries_per_kv
    length = 9
    if mlp_kept == 0:
        # no MLP at all: only the attention part, from a full-MLP layer minus the MLP counter
        model = llama(1, kv_kept * q, kv_kept, 16, 128)
        flops = counted(model, 1, length).get_flop_counts()["LlamaForCausalLM.model.layers.0.self_attn"]
    else:
        model = llama(1, kv_kept * q, kv_kept, 16, mlp_kept * 128 // 4)
        flops = counted(model, 1, length).get_flop_counts()["LlamaForCausalLM.model.layers.0"]
    assert sum(flops.values()) == cost.layer_flops(length, kv_kept, mlp_kept, num_mlp_groups=4)


@pytest.mark.parametrize("shape", [MHA, GQA], ids=["mha", "gqa"])
def test_full_is_fixed_plus_every_unit(shape: DecoderShape) -> None:
    cost = CostModel(shape, num_prefix_layers=3, budget_rule="flops")
    for length in (1, 50):
        assert cost.fixed_flops(length) + sum(cost.unit_flops(length)) == cost.full_flops(length)
        for units_per_layer in (2, shape.num_kv_heads):
            assert units_per_layer * sum(cost.unit_flops(length, units_per_layer)) == sum(cost.unit_flops(length))
        assert cost.min_budget(length) == cost.fixed_flops(length) / cost.full_flops(length)
        assert 3 / 8 < cost.min_budget(length) < 1.0  # prefix layers plus the LM head


def test_min_budget_counts_the_lm_head() -> None:
    cost = CostModel(MHA, num_prefix_layers=4, budget_rule="flops")
    assert cost.min_budget(1) > cost.min_budget(100) > 0.5  # the head weighs more on short prompts


@pytest.mark.parametrize("shape", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("units_per_layer", [1, 2])
@pytest.mark.parametrize("length", [1, 17, 400])
def test_units_fit_and_are_maximal(shape: DecoderShape, units_per_layer: int, length: int) -> None:
    cost = CostModel(shape, num_prefix_layers=3, budget_rule="flops")
    minimum = cost.min_budget(length)
    budgets = torch.linspace(minimum, 1.0, 200, dtype=torch.float64)
    budgets[0] = minimum  # exactly, not rounded by linspace
    lengths = torch.full((200,), length)
    k = cost.units_for_budget(budgets, lengths, units_per_layer)
    unit = cost.unit_flops(length, units_per_layer)[0]
    fixed, full = cost.fixed_flops(length), cost.full_flops(length)
    total = len(cost.unit_flops(length)) * units_per_layer
    assert int(k[0]) == 0 and int(k[-1]) == total
    assert bool((k[1:] >= k[:-1]).all())
    for budget, units in zip(budgets.tolist(), k.tolist(), strict=True):
        assert fixed + units * unit <= budget * full
        if units < total:
            assert fixed + (units + 1) * unit > budget * full


def test_reference_rule_can_exceed_the_budget_ours_cannot() -> None:
    cost = CostModel(MHA, num_prefix_layers=4, budget_rule="flops")
    length, budget = 10, 0.75
    full = cost.full_flops(length)
    layer = cost.layer_flops(length)
    reference_k = math.floor(MHA.num_layers * budget) - 4  # ignores the LM head
    assert cost.fixed_flops(length) + reference_k * layer > budget * full
    ours = int(cost.units_for_budget(torch.tensor([budget]), torch.tensor([length]))[0])
    assert ours == reference_k - 1
    assert cost.fixed_flops(length) + ours * layer <= budget * full


def test_budget_errors_name_the_admissible_range() -> None:
    cost = CostModel(GQA, num_prefix_layers=4, budget_rule="flops")
    minimum = cost.min_budget(12)
    shown = f"[{math.ceil(minimum * 1e6) / 1e6:.6f}, 1.0]"
    for bad in (1.5, -0.1, float("nan"), minimum - 0.01, 0.0):
        with pytest.raises(ValueError, match="admissible range") as error:
            cost.units_for_budget(torch.tensor([1.0, bad], dtype=torch.float64), torch.tensor([12, 12]))
        assert shown in str(error.value)
        assert "sequence length 12" in str(error.value)
    # the minimum itself, even rounded to float32, is admissible and runs nothing but the prefix
    k = cost.units_for_budget(torch.tensor([minimum]), torch.tensor([12]))
    assert k.tolist() == [0]


def test_plan_flops_layer_and_head_level() -> None:
    cost = CostModel(GQA, num_prefix_layers=4, budget_rule="flops")
    lengths = torch.tensor([10, 20])
    layer_mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    flops = cost.plan_flops(ExecutionPlan(4, layer_mask), lengths)
    assert flops.dtype == torch.float64
    assert flops.tolist() == [cost.fixed_flops(10) + 2 * cost.layer_flops(10), cost.fixed_flops(20)]

    attention = torch.zeros(2, 4, 2)
    mlp = torch.zeros(2, 4, 8)
    attention[0, 0, 1] = 1
    mlp[0, 0, :3] = 1
    attention[0, 3] = 1
    mlp[1, 2, 5] = 1  # an MLP group without any attention group
    head_mask = ((attention.sum(-1) + mlp.sum(-1)) > 0).float()
    flops = cost.plan_flops(ExecutionPlan(4, head_mask, attention, mlp), lengths)
    expected0 = cost.fixed_flops(10) + cost.layer_flops(10, 1, 3, 8) + cost.layer_flops(10, 2, 0, 8)
    expected1 = cost.fixed_flops(20) + cost.layer_flops(20, 0, 1, 8)
    assert flops.tolist() == [expected0, expected1]


def test_plan_flops_rejects_a_plan_for_other_layers() -> None:
    cost = CostModel(GQA, num_prefix_layers=4, budget_rule="flops")
    with pytest.raises(ValueError, match="plan covers layers"):
        cost.plan_flops(ExecutionPlan.full(1, 8, 3), torch.tensor([5]))


def test_dropped_tokens_units_are_conservative() -> None:
    """A selector that halves the tokens after layer 4 makes the later layers cheaper: k assumes the
    most expensive units, so any plan of k units fits, while the full count is still reachable."""
    cost = CostModel(MHA, num_prefix_layers=2, budget_rule="flops")
    length = 64
    per_layer = [64] * 5 + [32] * 3
    tokens = torch.tensor([per_layer] * 200)
    full = cost.full_flops(length, per_layer)
    assert full < cost.full_flops(length)
    assert full == sum(cost.layer_flops(t) for t in per_layer) + cost.lm_head_flops()
    minimum = cost.min_budget(length, per_layer)
    budgets = torch.linspace(minimum, 1.0, 200, dtype=torch.float64)
    k = cost.units_for_budget(budgets, torch.full((200,), length), layer_tokens=tokens)
    units = sorted(cost.unit_flops(length, layer_tokens=per_layer), reverse=True)
    assert units[0] > units[-1]
    assert int(k[-1]) == 6
    for budget, count in zip(budgets.tolist(), k.tolist(), strict=True):
        worst = cost.fixed_flops(length, per_layer) + sum(units[:count])
        assert worst <= budget * full
        if count < 6:
            assert worst + units[count] > budget * full
    # plan_flops reads the same per-layer tokens
    mask = torch.zeros(1, 6)
    mask[0, 5] = 1
    flops = cost.plan_flops(ExecutionPlan(2, mask), torch.tensor([length]), tokens[:1])
    assert flops.tolist() == [cost.fixed_flops(length, per_layer) + cost.layer_flops(32)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_prefix_layers"):
        CostModel(MHA, num_prefix_layers=8, budget_rule="flops")
    cost = CostModel(MHA, num_prefix_layers=2, budget_rule="flops")
    with pytest.raises(ValueError, match="layer_tokens has 3 entries"):
        cost.full_flops(5, [5, 5, 5])
    with pytest.raises(ValueError, match="units_per_layer"):
        cost.unit_flops(5, units_per_layer=3)


def test_fastv_layer_tokens_keep_plans_within_budget() -> None:
    """FastV's count of the tokens reaching each layer, fed to the cost model: any plan of k units fits."""
    from adaptive_mllm.token_selection import FastV

    cost = CostModel(MHA, num_prefix_layers=2, budget_rule="flops")
    seq_lens, images = torch.tensor([40, 600, 13]), torch.tensor([16, 576, 0])
    tokens = FastV(layer_index=2, drop_ratio=0.5).layer_tokens(seq_lens, images, MHA.num_layers)
    assert tokens.tolist() == [[40, 40] + [32] * 6, [600, 600] + [312] * 6, [13] * 8]
    for budget in torch.linspace(0.55, 1.0, 10).tolist():
        budgets = torch.full((3,), budget, dtype=torch.float64)
        k = cost.units_for_budget(budgets, seq_lens, layer_tokens=tokens)
        for row in range(3):
            mask = torch.zeros(1, 6)
            mask[0, : int(k[row])] = 1
            flops = cost.plan_flops(ExecutionPlan(2, mask), seq_lens[row : row + 1], tokens[row : row + 1])
            assert float(flops) <= budget * cost.full_flops(int(seq_lens[row]), tokens[row].tolist())


# --- Phi (Mipha): fc1 / fc2 MLP, biases everywhere, partial rotary ---------------------------------------
def phi(num_layers: int, num_heads: int, intermediate: int, qk_layernorm: bool = False):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(num_hidden_layers=num_layers, hidden_size=64, num_attention_heads=num_heads, head_dim=16,
                       intermediate_size=intermediate, vocab_size=100, partial_rotary_factor=0.5,
                       qk_layernorm=qk_layernorm, attn_implementation="eager")
    return PhiForCausalLM(config).eval()


def phi_shape(num_layers: int = 4, num_heads: int = 4, intermediate: int = 128) -> DecoderShape:
    return DecoderShape(num_layers=num_layers, hidden_size=64, num_heads=num_heads, num_kv_heads=num_heads, head_dim=16,
                        intermediate_size=intermediate, vocab_size=100, mlp_matrices=2)


@pytest.mark.parametrize("qk_layernorm", [False, True])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_phi_full_flops_match_flop_counter(length: int, qk_layernorm: bool) -> None:
    model = phi(4, 4, 128, qk_layernorm)
    cost = CostModel(phi_shape(), num_prefix_layers=2, budget_rule="flops")
    counter = counted(model, batch=2, length=length)
    assert counter.get_total_flops() == 2 * cost.full_flops(length)
    assert sum(counter.get_flop_counts()["PhiForCausalLM.lm_head"].values()) == 2 * cost.lm_head_flops()
    # the gated-MLP count would be wrong for Phi: the two-matrix MLP is what makes it exact
    assert cost.mlp_flops(length, 128) == 4 * length * 64 * 128


@pytest.mark.parametrize(("heads_kept", "mlp_kept"), [(1, 1), (1, 3), (2, 4), (3, 2)])
def test_phi_partial_layer_matches_a_smaller_layer(heads_kept: int, mlp_kept: int) -> None:
    """A Phi layer keeping ``heads_kept`` of 4 heads and ``mlp_kept`` of 4 MLP groups costs what a Phi layer
    of exactly those sizes costs (what the engine's sliced fc1 / fc2 and q/k/v/dense compute)."""
    cost = CostModel(phi_shape(), num_prefix_layers=2, budget_rule="flops")
    model = phi(1, heads_kept, mlp_kept * 128 // 4)
    flops = counted(model, 1, 9).get_flop_counts()["PhiForCausalLM.model.layers.0"]
    assert sum(flops.values()) == cost.layer_flops(9, heads_kept, mlp_kept, num_mlp_groups=4)


def test_phi_plan_flops_count_two_mlp_matrices() -> None:
    shape = phi_shape()
    cost = CostModel(shape, num_prefix_layers=2, budget_rule="flops")
    plan = ExecutionPlan(2, torch.ones(1, 2), torch.ones(1, 2, 4), torch.tensor([[[1.0, 0, 0, 0], [1, 1, 1, 1]]]))
    expected = cost.fixed_flops(5) + cost.layer_flops(5, 4, 1, 4) + cost.layer_flops(5)
    assert float(cost.plan_flops(plan, torch.tensor([5]))[0]) == expected


@pytest.mark.parametrize("shape, units_per_layer", [(MHA, 1), (GQA, 2)])
def test_budget_for_units_allows_exactly_that_many_units(shape: DecoderShape, units_per_layer: int) -> None:
    cost = CostModel(shape, num_prefix_layers=3, budget_rule="flops")
    tokens = [40] * 3 + [20] * 5  # tokens dropped after layer 3: units differ in cost
    for layer_tokens in (None, tokens):
        length = 40
        total = len(cost.unit_flops(length)) * units_per_layer
        budgets = [cost.budget_for_units(k, length, units_per_layer, layer_tokens) for k in range(total + 1)]
        assert budgets[-1] == 1.0 and all(a < b for a, b in zip(budgets, budgets[1:], strict=False))
        per_layer = None if layer_tokens is None else torch.tensor([layer_tokens] * (total + 1))
        # float32, as training passes them on: the middle of a level survives the rounding
        k = cost.units_for_budget(torch.tensor(budgets), torch.full((total + 1,), length), units_per_layer, per_layer)
        assert k.tolist() == list(range(total + 1))
    with pytest.raises(ValueError, match=r"units=99 must be in \[0, "):
        cost.budget_for_units(99, 40, units_per_layer)


# --- uneven MLP groups (Vicuna-13B: 13824 neurons in 40 groups) -----------------------------------------
UNEVEN = DecoderShape(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=130, vocab_size=100)
# 130 neurons in 4 groups: 33, 33, 32, 32 (the release's split: the first 130 mod 4 = 2 groups one wider)


def test_uneven_plan_flops_match_a_layer_of_the_kept_neurons() -> None:
    """A plan keeping MLP groups 1 and 3 (33 + 32 = 65 neurons) and one kv group costs what FlopCounterMode
    counts for a layer with exactly 1 head and 65 neurons."""
    cost = CostModel(UNEVEN, num_prefix_layers=5, budget_rule="flops")
    length = 7
    attention = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    mlp = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])
    flops = cost.plan_flops(ExecutionPlan(5, torch.ones(1, 1), attention, mlp), torch.tensor([length]))
    layer = counted(llama(1, 1, 1, 16, 65), 1, length).get_flop_counts()["LlamaForCausalLM.model.layers.0"]
    assert float(flops[0]) == cost.fixed_flops(length) + sum(layer.values())


def test_uneven_units_fit_whichever_groups_are_picked() -> None:
    """Units of 2 MLP groups: the first unit of a layer may hold both wide groups (66 neurons), the second
    the narrow ones (64). Every plan of the ``k`` units a budget allows stays within it, and the count is the
    largest for which the widest plan does (the first unit per layer counted at 66, the next at 64)."""
    cost = CostModel(UNEVEN, num_prefix_layers=2, budget_rule="flops")
    length = 9
    wide, narrow = (cost.layer_flops(length, 2, 2, 4), cost.layer_flops(length, 4, 4, 4) - cost.layer_flops(length, 2, 2, 4))
    assert wide - narrow == 2 * cost.mlp_flops(length, 1)  # 66 against 64 neurons
    assert cost.unit_costs(length, 2) == [[wide, narrow]] * 4
    fixed, full = cost.fixed_flops(length), cost.full_flops(length)
    budgets = torch.linspace(cost.min_budget(length), 1.0, 300, dtype=torch.float64)
    k = cost.units_for_budget(budgets, torch.full((300,), length), 2)
    for budget, units in zip(budgets.tolist(), k.tolist(), strict=True):
        worst = fixed + min(units, 4) * wide + max(units - 4, 0) * narrow  # the wide units of 4 layers first
        assert worst <= budget * full
        if units < 8:
            assert worst + (wide if units < 4 else narrow) > budget * full
    assert k[-1] == 8


# --- the release's budget rule ----------------------------------------------------------------------------
VICUNA_7B = DecoderShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008, vocab_size=32000)
VICUNA_13B = DecoderShape(num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128, intermediate_size=13824, vocab_size=32000)


def test_release_rule_reproduces_the_papers_fastv_rows() -> None:
    """LLaVA-1.5-7B, prefix 16, FastV (K = 2, R = 0.5) on a 640-token prompt with 576 image tokens, budget 0.6:
    the release keeps floor(32 x 0.6) - 16 = 3 layers (it ignores the dropped tokens and the LM head); the
    FLOPs rule keeps 2. Head level (rank 8, 4 units per layer): floor(128 x 0.6) - 64 = 12 units, and at
    0.85 floor(108.8) - 64 = 44."""
    tokens = torch.tensor([[640] * 2 + [640 - 288] * 30])
    lengths, budget = torch.tensor([640]), torch.tensor([0.6])
    release = CostModel(VICUNA_7B, 16, budget_rule="release")
    flops = CostModel(VICUNA_7B, 16, budget_rule="flops")
    assert release.units_for_budget(budget, lengths, 1, tokens).tolist() == [3]
    assert flops.units_for_budget(budget, lengths, 1, tokens).tolist() == [2]
    assert release.units_for_budget(torch.tensor([0.6, 0.85]), torch.tensor([640, 640]), 4).tolist() == [12, 44]


def test_release_rule_below_the_prefix_is_zero_units() -> None:
    release = CostModel(VICUNA_7B, 16, budget_rule="release")
    budgets, lengths = torch.tensor([0.0, 0.3, 0.53, 0.55, 1.0]), torch.full((5,), 100)
    assert release.units_for_budget(budgets, lengths).tolist() == [0, 0, 0, 1, 16]  # floor(16.96) - 16 = 0, floor(17.6) - 16 = 1
    assert release.min_budget(100) == 0.5  # what those budgets cost: the 16 prefix layers of 32, in units
    with pytest.raises(ValueError, match="admissible range"):
        CostModel(VICUNA_7B, 16, budget_rule="flops").units_for_budget(torch.tensor([0.3]), torch.tensor([100]))
    for bad in (1.01, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            release.units_for_budget(torch.tensor([bad]), torch.tensor([100]))
    with pytest.raises(ValueError, match="budget_rule"):
        CostModel(VICUNA_7B, 16, budget_rule="paper")


def test_release_rule_reads_budgets_in_float16_as_the_release_evaluates() -> None:
    """float16 0.7 is 0.7002: 10 x it is 7 units, where float32's 6.99999988 would floor to 6; float16 0.29 is
    0.2900: 29 of 100."""
    ten = CostModel(DecoderShape(10, 64, 4, 4, 16, 128, 100), 2, budget_rule="release")
    assert ten.units_for_budget(torch.tensor([0.7], dtype=torch.float32), torch.tensor([5])).tolist() == [5]
    hundred = CostModel(DecoderShape(100, 64, 4, 4, 16, 128, 100), 0, budget_rule="release")
    assert hundred.units_for_budget(torch.tensor([0.29], dtype=torch.float64), torch.tensor([5])).tolist() == [29]


def release_units_in_numpy(budget: float, total: int, prefix: int) -> int:
    """The release's ``latency_quantizing`` on a float16 budget, computed apart: numpy's float16 rounds the budget
    and the exact float64 product."""
    return max(0, int(np.floor(np.float16(float(np.float16(budget)) * total))) - prefix)


@pytest.mark.parametrize(
    ("shape", "units_per_layer"), [(VICUNA_7B, 1), (VICUNA_7B, 4), (VICUNA_13B, 1), (VICUNA_13B, 5)], ids=["7B-L", "7B-H", "13B-L", "13B-H"]
)
def test_release_rule_equals_the_release_arithmetic_on_a_fine_grid(shape: DecoderShape, units_per_layer: int) -> None:
    cost = CostModel(shape, shape.num_layers // 2)
    total, prefix = shape.num_layers * units_per_layer, shape.num_layers // 2 * units_per_layer
    budgets = [round(0.001 * step, 3) for step in range(1001)]
    ours = cost.units_for_budget(torch.tensor(budgets, dtype=torch.float64), torch.full((1001,), 50), units_per_layer)
    assert ours.tolist() == [release_units_in_numpy(budget, total, prefix) for budget in budgets]


def test_release_rule_runs_what_the_release_runs_where_float16_moves_a_budget() -> None:
    """13B AdaLLaVA-H (200 units, 100 in the prefix): float16 0.55 is 0.5498, 200 x it 109.96, rounded to float16
    109.94: 9 units, where exact decimals give 10; 0.51 -> 101.95 -> 1 unit (not 2). The paper's 0.6 and 0.85
    are unmoved: 20 and 70."""
    cost = CostModel(VICUNA_13B, 20)
    budgets = torch.tensor([0.55, 0.51, 0.6, 0.85, 1.0], dtype=torch.float64)
    assert cost.units_for_budget(budgets, torch.full((5,), 50), 5).tolist() == [9, 1, 20, 70, 100]


def test_release_rule_level_budgets_are_the_middle_of_their_levels_values() -> None:
    """The middle of a level's float16 values, not of their bit patterns (which crowd near 0: without prefix
    layers level 0's budget was 0.001, not 0.5 / U)."""
    cost = CostModel(VICUNA_7B, 0)
    budgets = [cost.budget_for_units(units, 50, 4) for units in range(128)]
    assert budgets == pytest.approx([(units + 0.5) / 128 for units in range(128)], abs=1e-3)


def test_release_rule_refuses_a_level_float16_cannot_reach() -> None:
    """4096 units: float16's products above 2048 are even numbers, so 2049 units is no budget's."""
    cost = CostModel(DecoderShape(64, 64, 64, 64, 1, 128, 100), 32)  # 64 units per layer, 2048 in the prefix
    assert cost.units_for_budget(torch.tensor([cost.budget_for_units(2, 50, 64)]), torch.tensor([50]), 64).tolist() == [2]
    with pytest.raises(ValueError, match="no budget reaches 2049 of 4096 units.*budget_rule: flops"):
        cost.budget_for_units(1, 50, 64)
def test_release_rule_counts_every_exact_level_as_the_release_does() -> None:
    """Budgets j / U (the release's H training draws randint(64, 129) / 128) give j - U_prefix units, 7 decimals
    and all (rounding the budget to 6 decimals first lost a unit at 113, 117, 121, 125 of 128); float32 too."""
    release = CostModel(VICUNA_7B, 16)  # the default rule
    assert release.budget_rule == "release"
    levels = torch.arange(64, 129, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        k = release.units_for_budget((levels / 128).to(dtype), torch.full((65,), 50), 4)
        assert k.tolist() == (levels - 64).long().tolist()


@pytest.mark.parametrize(
    ("shape", "units_per_layer"), [(VICUNA_7B, 1), (VICUNA_7B, 4), (VICUNA_13B, 5), (VICUNA_7B, 32)], ids=["7B-L", "7B-H", "13B-H", "7B-rank1"]
)
def test_release_rule_budget_for_units_round_trips(shape: DecoderShape, units_per_layer: int) -> None:
    """Every level's budget gives that level back, as float64 and as the float32 tensor training makes of it."""
    release = CostModel(shape, shape.num_layers // 2, budget_rule="release")
    most = shape.num_layers // 2 * units_per_layer
    budgets = [release.budget_for_units(u, 50, units_per_layer) for u in range(most + 1)]
    assert budgets[-1] == 1.0 and all(a < b for a, b in zip(budgets, budgets[1:], strict=False))
    assert budgets[0] >= release.min_budget(50)  # no level's budget below what the prefix costs
    for dtype in (torch.float64, torch.float32):
        k = release.units_for_budget(torch.tensor(budgets, dtype=dtype), torch.full((most + 1,), 50), units_per_layer)
        assert k.tolist() == list(range(most + 1))
