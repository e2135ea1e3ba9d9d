"""Analytic prefill FLOPs of a Llama- or Phi-style decoder, and budget -> number of scheduler units.

A budget ``b`` means: the prefill of this request may spend at most ``b`` times the FLOPs of the
full model on the same request (same sequence length, same token selection). The count follows
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, matrix products only):

- per layer and token: q / k / v / o projections with the grouped-query sizes; gate / up / down of a
  gated MLP (Llama) or fc1 / fc2 of a plain one (Phi: ``DecoderShape.mlp_matrices`` = 2); biases and
  element-wise work (norms, rotary, activations, softmax, residuals) count 0, as FlopCounterMode does;
- attention scores ``Q K^T`` and ``A V`` are counted as **full** ``T x T`` products (no causal
  halving), because that is what SDPA kernels and FlopCounterMode count;
- the LM head runs on the **last position only** (generation needs only that logit row);
- embedding lookups count 0.

One key/value group (a kv head and the ``num_heads / num_kv_heads`` query heads that read it) costs,
for ``T`` tokens, ``2 T H d (2 q + 2) + 4 T^2 q d`` (H hidden, d head dim, q queries per kv head);
``n`` MLP neurons cost ``2 m T H n`` (``m`` matrices: 6 T H n for Llama, 4 T H n for Phi). A layer's cost is linear in the kept groups, which is what lets a
head-level plan be costed from its masks.

Budgets become unit counts here, not in the schedulers. Two rules (``budget_rule``):

- ``"release"`` (default, the reference's): the AdaLLaVA release's ``k = max(0, floor(U * b) - U_prefix)`` with
  ``U`` the model's units (``L`` layers, or ``L * num_heads / rank`` head units) and ``U_prefix`` those of the
  prefix layers. It counts units, not FLOPs: the LM head and any token selection are ignored, so a plan can
  exceed ``b`` of the full model's FLOPs a little (LLaVA-1.5-7B at 0.75: 24 of 32 layers and the LM head), and
  any budget in ``[0, 1]`` is accepted (below the prefix: 0 units). It gives the paper's rows. The arithmetic is
  the release's evaluation's, whose model runs in float16: ``b`` a float16 number, ``U * b`` rounded to float16,
  then the floor. So a budget that float16 cannot hold runs the level of its nearest float16 value: LLaVA-1.5-13B
  AdaLLaVA-H (200 units) at ``0.55`` (float16 ``0.5498``) runs 109 units, not 110, as the release does;
- ``"flops"`` (this project's): a plan **never** exceeds its budget: ``units_for_budget`` returns the largest
  ``k`` whose worst plan still fits, LM head and dropped tokens counted (one unit fewer than the release's at
  budgets that fall on a level, e.g. LLaVA-1.5-13B at 0.85 and 0.6; fewer with FastV).
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.layers import mlp_group_sizes

if TYPE_CHECKING:
    from adaptive_mllm.schedulers.plan import ExecutionPlan


BudgetRule = Literal["release", "flops"]


class CostModel:
    """Prefill FLOPs of one request, of a plan, and the number of scheduler units a budget allows.

    Args:
        shape: sizes of the LLM.
        num_prefix_layers: the first layers, which always run.
        budget_rule: ``"release"`` (the release's ``floor(U * b) - U_prefix`` units) or ``"flops"`` (a plan never
            exceeds its budget's FLOPs).
    """

    def __init__(self, shape: DecoderShape, num_prefix_layers: int, budget_rule: BudgetRule = "release") -> None:
        if budget_rule not in ("flops", "release"):
            raise ValueError(f"budget_rule={budget_rule!r} must be 'flops' or 'release'")
        if not 0 <= num_prefix_layers < shape.num_layers:
            raise ValueError(
                f"num_prefix_layers={num_prefix_layers} must be in [0, {shape.num_layers - 1}] for an LLM of {shape.num_layers} layers"
            )
        if shape.num_heads % shape.num_kv_heads:
            raise ValueError(f"num_heads={shape.num_heads} is not a multiple of num_kv_heads={shape.num_kv_heads}")
        self.shape = shape
        self.num_prefix_layers = num_prefix_layers
        self.budget_rule = budget_rule

    @property
    def num_scheduled_layers(self) -> int:
        return self.shape.num_layers - self.num_prefix_layers

    # --- pieces ----------------------------------------------------------------------------------
    def attention_group_flops(self, tokens: int) -> int:
        """One key/value group (kv head + its query heads): q/k/v/o slices and the T x T attention."""
        s = self.shape
        q = s.queries_per_kv
        projections = 2 * tokens * s.hidden_size * s.head_dim * (2 * q + 2)  # q, o: q heads; k, v: one head
        attention = 4 * tokens * tokens * q * s.head_dim  # Q K^T and A V, full T x T
        return projections + attention

    def mlp_flops(self, tokens: int, neurons: int) -> int:
        """``neurons`` intermediate neurons of the MLP: gate, up and down (Llama) or fc1 and fc2 (Phi)."""
        return 2 * self.shape.mlp_matrices * tokens * self.shape.hidden_size * neurons

    def lm_head_flops(self) -> int:
        """The LM head on the last position only."""
        return 2 * self.shape.hidden_size * self.shape.vocab_size

    def layer_flops(
        self,
        seq_len: int,
        kv_groups_kept: int | None = None,
        mlp_groups_kept: int | None = None,
        num_mlp_groups: int | None = None,
    ) -> int:
        """One decoder layer on ``seq_len`` tokens; None keeps every group. MLP groups are
        ``num_mlp_groups`` (default ``num_heads``) contiguous slices of the intermediate size; when they are
        uneven (:func:`mlp_group_sizes`) ``mlp_groups_kept`` counts the widest ones: the most it can cost."""
        s = self.shape
        kv = s.num_kv_heads if kv_groups_kept is None else kv_groups_kept
        if not 0 <= kv <= s.num_kv_heads:
            raise ValueError(f"kv_groups_kept={kv} must be in [0, {s.num_kv_heads}]")
        if mlp_groups_kept is None:
            neurons = s.intermediate_size
        else:
            sizes = mlp_group_sizes(s.intermediate_size, s.num_heads if num_mlp_groups is None else num_mlp_groups)
            if not 0 <= mlp_groups_kept <= len(sizes):
                raise ValueError(f"mlp_groups_kept={mlp_groups_kept} must be in [0, {len(sizes)}]")
            neurons = sum(sizes[:mlp_groups_kept])  # the widest groups come first
        return kv * self.attention_group_flops(seq_len) + self.mlp_flops(seq_len, neurons)

    def tokens_per_layer(self, seq_len: int, layer_tokens: Sequence[int] | None = None) -> list[int]:
        """Tokens reaching each of the L layers (a token selector inside the LLM makes them differ)."""
        if layer_tokens is None:
            return [int(seq_len)] * self.shape.num_layers
        tokens = [int(t) for t in layer_tokens]
        if len(tokens) != self.shape.num_layers:
            raise ValueError(f"layer_tokens has {len(tokens)} entries, the LLM has {self.shape.num_layers} layers")
        return tokens

    # --- whole requests ----------------------------------------------------------------------------
    def fixed_flops(self, seq_len: int, layer_tokens: Sequence[int] | None = None) -> int:
        """What every plan spends: the prefix layers and the LM head."""
        tokens = self.tokens_per_layer(seq_len, layer_tokens)
        return sum(self.layer_flops(t) for t in tokens[: self.num_prefix_layers]) + self.lm_head_flops()

    def full_flops(self, seq_len: int, layer_tokens: Sequence[int] | None = None) -> int:
        """The full model's prefill: budget 1.0."""
        tokens = self.tokens_per_layer(seq_len, layer_tokens)
        return sum(self.layer_flops(t) for t in tokens) + self.lm_head_flops()

    def min_budget(self, seq_len: int, layer_tokens: Sequence[int] | None = None) -> float:
        """The budget of the cheapest plan (0 scheduled units): prefix layers + LM head as a fraction of the full
        model's FLOPs; under the release's rule, which counts units, the prefix's share of them (``U_prefix / U``).
        A lower budget is refused under ``flops``; the release's rule admits it and runs that same plan, so serving,
        profiles and ``at_least_minimum`` raise it to this one, the budget it costs."""
        if self.budget_rule == "release":
            return self.num_prefix_layers / self.shape.num_layers
        return self.fixed_flops(seq_len, layer_tokens) / self.full_flops(seq_len, layer_tokens)

    def unit_flops(self, seq_len: int, units_per_layer: int = 1, layer_tokens: Sequence[int] | None = None) -> list[int]:
        """Cost of one unit in each schedulable layer, when a layer splits into ``units_per_layer`` units
        (layer level: 1; head level: ``num_heads // rank``): the most expensive one where MLP groups are uneven."""
        return [costs[0] for costs in self.unit_costs(seq_len, units_per_layer, layer_tokens)]

    def unit_costs(self, seq_len: int, units_per_layer: int = 1, layer_tokens: Sequence[int] | None = None) -> list[list[int]]:
        """Per schedulable layer, the most its ``j``-th unit can add, for ``j`` in ``[0, units_per_layer)``.

        A unit holds ``num_kv_heads / units_per_layer`` kv groups and ``num_heads / units_per_layer`` MLP
        groups. Equal groups make every unit cost the same; uneven MLP groups (the first ``I mod G`` one
        neuron wider) make the ``j``-th unit at most the ``j``-th slice of the groups sorted widest first,
        a non-increasing list, so the worst plan of ``u`` units in a layer is its first ``u`` entries."""
        s = self.shape
        if units_per_layer < 1 or s.num_kv_heads % units_per_layer or s.num_heads % units_per_layer:
            raise ValueError(
                f"units_per_layer={units_per_layer} must divide num_kv_heads={s.num_kv_heads} and num_heads={s.num_heads}"
            )
        tokens = self.tokens_per_layer(seq_len, layer_tokens)[self.num_prefix_layers :]
        if units_per_layer == 1:
            return [[self.layer_flops(t)] for t in tokens]
        kv, mlp = s.num_kv_heads // units_per_layer, s.num_heads // units_per_layer
        costs = []
        for t in tokens:
            spent = [self.layer_flops(t, j * kv, j * mlp, s.num_heads) for j in range(units_per_layer + 1)]
            costs.append([after - before for before, after in zip(spent[:-1], spent[1:], strict=True)])
        return costs

    # --- budgets -----------------------------------------------------------------------------------
    def check_budgets(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> None:
        """Raise a ValueError naming the admissible range for any budget outside ``[min_budget, 1]``.

        The minimum is compared in the budgets' own precision, so a budget drawn as
        ``torch.tensor(min_budget)`` (float32) is admissible; it gets zero units.
        """
        values = budgets.detach().cpu()
        lengths = seq_lens.detach().cpu().tolist()
        tokens = None if layer_tokens is None else layer_tokens.detach().cpu().tolist()
        for index, (budget, length) in enumerate(zip(values, lengths, strict=True)):
            if self.budget_rule == "release":
                if not (budget >= 0.0 and budget <= 1.0):  # also catches NaN
                    raise ValueError(f"budget {float(budget):g} (example {index}) is outside [0, 1] (budget_rule 'release')")
                continue
            minimum = self.min_budget(length, None if tokens is None else tokens[index])
            floor = torch.tensor(minimum, dtype=values.dtype)
            if not (budget >= floor and budget <= 1.0):  # also catches NaN
                raise ValueError(
                    f"budget {float(budget):g} (example {index}) is outside the admissible range "
                    f"[{math.ceil(minimum * 1e6) / 1e6:.6f}, 1.0] for sequence length {length}: below the minimum "
                    f"only the {self.num_prefix_layers} prefix layers and the LM head would run"
                )

    def units_for_budget(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        units_per_layer: int = 1,
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor:
        """[B] long: the largest ``k`` such that ANY plan of ``k`` units stays within
        ``budget * full_flops``. When units differ in cost (tokens dropped inside the LLM) the ``k`` most
        expensive units are assumed, so the bound holds whichever units the scheduler picks."""
        self.check_budgets(budgets, seq_lens, layer_tokens)
        values = budgets.detach().double().cpu().tolist()
        if self.budget_rule == "release":
            counts = [self._release_units(budget, units_per_layer) for budget in values]
            return torch.tensor(counts, dtype=torch.long, device=budgets.device)
        lengths = seq_lens.detach().cpu().tolist()
        tokens = None if layer_tokens is None else layer_tokens.detach().cpu().tolist()
        counts = []
        for index, (budget, length) in enumerate(zip(values, lengths, strict=True)):
            spent = self._cumulative_flops(length, units_per_layer, None if tokens is None else tokens[index])
            allowed = budget * self.full_flops(length, None if tokens is None else tokens[index])
            # spent[i] = fixed + the i most expensive units; Python compares int <= float exactly
            counts.append(max(0, bisect.bisect_right(spent, allowed) - 1))
        return torch.tensor(counts, dtype=torch.long, device=budgets.device)

    def budget_for_units(
        self, units: int, seq_len: int, units_per_layer: int = 1, layer_tokens: Sequence[int] | None = None
    ) -> float:
        """A budget that allows exactly ``units`` units: the middle of that level (1.0 for all units), so
        float rounding never moves it to a neighbouring level. Training draws levels, then this budget."""
        if self.budget_rule == "release":
            most = self.num_scheduled_layers * units_per_layer
            if not 0 <= units <= most:
                raise ValueError(f"units={units} must be in [0, {most}]")
            prefix, total = self.num_prefix_layers * units_per_layer, self.shape.num_layers * units_per_layer
            return 1.0 if units == most else _release_budget(prefix + units, total)
        spent = self._cumulative_flops(seq_len, units_per_layer, layer_tokens)
        if not 0 <= units < len(spent):
            raise ValueError(f"units={units} must be in [0, {len(spent) - 1}]")
        if units == len(spent) - 1:
            return 1.0
        return (spent[units] + spent[units + 1]) / 2 / self.full_flops(seq_len, layer_tokens)

    def _release_units(self, budget: float, units_per_layer: int) -> int:
        """The release's ``max(0, floor(U * b) - U_prefix)``, in float16 as its evaluation computes it."""
        prefix, total = self.num_prefix_layers * units_per_layer, self.shape.num_layers * units_per_layer
        return max(0, _release_level(budget, total) - prefix)

    def _cumulative_flops(self, seq_len: int, units_per_layer: int, layer_tokens: Sequence[int] | None) -> list[int]:
        """[fixed, fixed + the most expensive unit, ...]: the worst-case cost of each unit count."""
        units = sorted((cost for costs in self.unit_costs(seq_len, units_per_layer, layer_tokens) for cost in costs), reverse=True)
        spent = [self.fixed_flops(seq_len, layer_tokens)]
        for cost in units:  # each layer's list is non-increasing: the k largest are a valid plan
            spent.append(spent[-1] + cost)  # exact integers
        return spent

    # --- plans -------------------------------------------------------------------------------------
    def plan_flops(
        self,
        plan: ExecutionPlan,
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor:
        """[B] float64: prefill FLOPs of each example under the plan (masks read as hard 0/1)."""
        s = self.shape
        if plan.num_prefix_layers != self.num_prefix_layers or plan.num_scheduled_layers != self.num_scheduled_layers:
            raise ValueError(
                f"the plan covers layers {plan.num_prefix_layers}..{plan.num_prefix_layers + plan.num_scheduled_layers - 1}, "
                f"the cost model {self.num_prefix_layers}..{s.num_layers - 1}"
            )
        device = plan.layer_mask.device
        if layer_tokens is None:
            tokens = seq_lens.to(device=device, dtype=torch.float64)[:, None].expand(-1, s.num_layers)  # [B, L]
        else:
            tokens = layer_tokens.to(device=device, dtype=torch.float64)  # [B, L]
        q = s.queries_per_kv
        attention_group = 2 * tokens * s.hidden_size * s.head_dim * (2 * q + 2) + 4 * tokens**2 * q * s.head_dim  # [B, L]
        mlp_neuron = 2 * s.mlp_matrices * tokens * s.hidden_size  # [B, L]
        full_layer = s.num_kv_heads * attention_group + s.intermediate_size * mlp_neuron  # [B, L]

        prefix = full_layer[:, : self.num_prefix_layers].sum(-1)  # [B]
        runs = (plan.layer_mask.detach() > 0.5).double()  # [B, L_sched]
        if plan.head_mask is None:
            kv_kept = runs * s.num_kv_heads
        else:
            kv_kept = runs * (plan.head_mask.detach() > 0.5).double().sum(-1)
        if plan.mlp_mask is None:
            neurons = runs * s.intermediate_size
        else:
            sizes = torch.tensor(mlp_group_sizes(s.intermediate_size, plan.mlp_mask.shape[-1]), dtype=torch.float64, device=device)
            neurons = runs * ((plan.mlp_mask.detach() > 0.5).double() @ sizes)
        scheduled = (
            kv_kept * attention_group[:, self.num_prefix_layers :] + neurons * mlp_neuron[:, self.num_prefix_layers :]
        ).sum(-1)  # [B]
        return prefix + scheduled + self.lm_head_flops()


# --- the release's budget arithmetic ---------------------------------------------------------------------
FLOAT16_ONE = 0x3C00  # float16's bit pattern of 1.0; from 0 up to it, patterns are ordered as the values they hold


def _release_level(budget: float, total: int) -> int:
    """``floor(U * b)`` as the release computes it at evaluation: ``latency_quantizing`` on a budget tensor of the
    model's dtype, float16 there (``torch.full(..., latency, dtype=self.dtype)``), so ``b`` and the product are
    float16 numbers. In Python (``struct``'s IEEE half, rounded to nearest even as torch rounds): it runs for every
    example of every batch, and a torch scalar took 20 times as long."""
    return math.floor(_to_float16(_to_float16(budget) * total))


def _to_float16(value: float) -> float:
    return struct.unpack("<e", struct.pack("<e", value))[0]


def _float16(pattern: int) -> float:
    return struct.unpack("<e", struct.pack("<H", pattern))[0]


@functools.lru_cache(maxsize=4096)
def _release_budget(level: int, total: int) -> float:
    """The float16 budget in the middle of those the release turns into ``level`` of ``total`` units (of their values,
    not of their bit patterns, which crowd near 0): it survives
    float32 (training's tensors) and float16 unchanged. A ValueError for a level no float16 budget reaches (above
    2048 units, where float16's products skip levels)."""

    def first_reaching(target: int) -> int:  # the lowest pattern whose level is >= target
        low, high = 0, FLOAT16_ONE + 1
        while low < high:
            middle = (low + high) // 2
            if _release_level(_float16(middle), total) >= target:
                high = middle
            else:
                low = middle + 1
        return low

    start, end = first_reaching(level), first_reaching(level + 1)
    if start >= end:
        raise ValueError(
            f"no budget reaches {level} of {total} units in the release's float16 arithmetic; "
            "use budget_rule: flops, or fewer units (a larger scheduler rank)"
        )
    return _to_float16((_float16(start) + _float16(end - 1)) / 2)  # between two of the level's values: of the level
