"""Planning: the one way from a batch and its budgets to what the engine needs, and back to FLOPs.

Training, evaluation, generation, the benchmark and serving all go through :class:`Planner`:

1. :meth:`Planner.embed`: input embeddings, with the token selector's before-LLM choice;
2. :meth:`Planner.prepare`: the budgets checked (or drawn, in training) against the request's sizes
   (:class:`PlanInputs`), the latency token inserted where the scheduler reads it, and the plan
   request the engine completes at layer ``num_prefix_layers`` (or the plan itself, for a scheduler
   that reads no token);
3. :meth:`Planner.flops_fraction`: what the plan the engine used costs, as a fraction of the full
   model on the same request (same length, same token selection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.cost import CostModel
from adaptive_mllm.engine import PlanRequest
from adaptive_mllm.inputs import SelectedInputs, embed_selected, insert_token, position_ids_from_mask
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.token_selection.base import TokenLayout, TokenSelector, insert_column, remap_positions


@dataclass
class PlanInputs:
    """What a plan depends on besides the hidden state: per example, the budget and the sizes it is
    measured against."""

    budgets: torch.Tensor | None  # [B] fraction of the full model's prefill FLOPs; None: the full model
    seq_lens: torch.Tensor  # [B] tokens reaching the LLM, latency token included
    layer_tokens: torch.Tensor | None = None  # [B, L] tokens reaching each layer (None: seq_lens everywhere)

    def per_example_tokens(self) -> list[list[int] | None]:
        return [None] * len(self.seq_lens) if self.layer_tokens is None else self.layer_tokens.tolist()


@dataclass
class Prepared:
    """The engine's inputs for one batch under its budgets."""

    embeds: torch.Tensor  # [B, T, H], latency token included
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    image_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor | None  # [B, T], IGNORE_INDEX at the latency token
    latency_positions: torch.Tensor | None  # [B] where the latency token is; None without one
    plan: PlanRequest | ExecutionPlan | None  # None: the full model
    inputs: PlanInputs
    in_llm_selection: bool = False  # the token selector drops tokens inside the LLM
    query_positions: torch.Tensor | None = None  # [B] the prompt's last column (training); None: each row's last

    def layout(self) -> TokenLayout | None:
        """A fresh layout for one engine run (the engine records its in-LLM drop in it); None when no
        token is dropped inside the LLM."""
        return TokenLayout(self.image_mask, self.query_positions) if self.in_llm_selection else None


class Planner:
    """Budgets -> latency token -> plan request -> FLOPs fraction, for one backbone, scheduler and
    token selector (each of the last two may be None)."""

    def __init__(self, backbone: Backbone, scheduler: Scheduler | None, token_selector: TokenSelector | None) -> None:
        self.backbone = backbone
        self.scheduler = scheduler
        self.token_selector = token_selector

    @property
    def uses_latency_token(self) -> bool:
        return self.scheduler is not None and self.scheduler.needs_latency_token

    @property
    def cost(self) -> CostModel:
        """The scheduler's cost model; without a scheduler, that of the full model."""
        return self.scheduler.cost if self.scheduler is not None else CostModel(self.backbone.shape, 0)

    def seq_lens(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] tokens reaching the LLM for a [B, T] mask of the tokens before it (latency token included)."""
        return attention_mask.sum(-1) + int(self.uses_latency_token)

    def layer_tokens(self, seq_lens: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor | None:
        """[B, L] tokens reaching each LLM layer under the token selector (None: ``seq_lens`` everywhere)."""
        if self.token_selector is None:
            return None
        return self.token_selector.layer_tokens(seq_lens, image_mask.sum(-1), self.backbone.shape.num_layers)

    # --- the steps -------------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None,
        labels: torch.Tensor | None = None,  # [B, T]
    ) -> SelectedInputs:
        """Input embeddings with the image features the token selector lets reach the LLM."""
        return embed_selected(self.backbone, input_ids, attention_mask, pixel_values, self.token_selector, labels)

    def prepare(
        self,
        inputs: SelectedInputs,
        budgets: torch.Tensor | None,
        latency_positions: torch.Tensor | None = None,
        draw_range: tuple[float, float] | None = None,
        at_least_minimum: bool = False,
    ) -> Prepared:
        """The engine's inputs under ``budgets`` ([B]; None: drawn from ``draw_range``).

        ``at_least_minimum``: a budget below its example's smallest admissible one is raised to it, the minimum
        counted on the tokens that reach each layer once the token selector has run (a server's rule; else such a
        budget is an error). ``plan_inputs.budgets`` holds the budgets that run.

        ``latency_positions`` [B]: where the latency token goes, as columns of the batch before the
        selector (the prompt's end in training); None: after the last position (generation). An in-LLM
        selector ranks tokens from the prompt's last position (the latency token where there is one), so a
        teacher-forced batch drops the tokens its prompt would drop when answered.
        """
        embeds, mask, image_mask, labels = inputs.embeds, inputs.attention_mask, inputs.image_mask, inputs.labels
        scheduler = self.scheduler
        position_ids = position_ids_from_mask(mask)
        seq_lens = self.seq_lens(mask)
        plan_inputs = PlanInputs(budgets, seq_lens, self.layer_tokens(seq_lens, image_mask))
        prompt_ends = latency_positions  # [B] exclusive ends of the prompts, as columns before the selector
        if prompt_ends is not None and inputs.source_index is not None:  # the prompt lost image tokens before the LLM
            prompt_ends = remap_positions(inputs.source_index, prompt_ends)
        query = None if prompt_ends is None else prompt_ends - 1
        if scheduler is None:
            return Prepared(embeds, mask, position_ids, image_mask, labels, None, None, plan_inputs, self._in_llm(), query)
        if budgets is None:
            if draw_range is None:
                raise ValueError("prepare: give budgets, or draw_range to draw them")
            plan_inputs.budgets = self.draw_budgets(plan_inputs, draw_range)
        elif at_least_minimum:
            plan_inputs.budgets = torch.maximum(plan_inputs.budgets, self.min_budgets(plan_inputs))
        scheduler.check_budgets(plan_inputs.budgets, seq_lens, plan_inputs.layer_tokens)
        if self.uses_latency_token:
            latency_positions = prompt_ends
            if latency_positions is None:
                latency_positions = torch.full((embeds.shape[0],), embeds.shape[1], device=embeds.device)
            token = scheduler.latency_token(plan_inputs.budgets, seq_lens, plan_inputs.layer_tokens)
            embeds, mask, labels = insert_token(embeds, token, latency_positions, mask, labels)
            image_mask = insert_column(image_mask, latency_positions, False)
            position_ids = position_ids_from_mask(mask)
            query = None if prompt_ends is None else latency_positions  # the token closes the prompt
        else:
            latency_positions = None
        plan = self.request(plan_inputs)
        return Prepared(
            embeds, mask, position_ids, image_mask, labels, latency_positions, plan, plan_inputs, self._in_llm(), query
        )

    def request(self, plan_inputs: PlanInputs) -> PlanRequest | ExecutionPlan:
        """A plan the engine completes at the latency token, or, for a scheduler that reads no token, the plan."""
        scheduler = self.scheduler
        budgets, seq_lens, layer_tokens = plan_inputs.budgets, plan_inputs.seq_lens, plan_inputs.layer_tokens
        if not scheduler.needs_latency_token:
            return scheduler(None, budgets, seq_lens, layer_tokens)
        return PlanRequest(scheduler.num_prefix_layers, lambda hidden: scheduler(hidden, budgets, seq_lens, layer_tokens))

    def min_budgets(self, plan_inputs: PlanInputs) -> torch.Tensor:
        """[B] each example's smallest admissible budget (in the budgets' dtype, as ``check_budgets`` compares)."""
        cost = self.scheduler.cost
        pairs = zip(plan_inputs.seq_lens.tolist(), plan_inputs.per_example_tokens(), strict=True)
        budgets = plan_inputs.budgets
        return torch.tensor([cost.min_budget(int(n), tokens) for n, tokens in pairs], dtype=budgets.dtype, device=budgets.device)

    def draw_budgets(self, plan_inputs: PlanInputs, budget_range: tuple[float, float]) -> torch.Tensor:
        """[B] one budget per example, uniform over the admissible levels (unit counts) of ``budget_range``,
        the full model included: a continuous draw would never reach budget 1.0. ``plan_inputs.budgets``
        is not read."""
        low, high = budget_range
        cost, units_per_layer = self.scheduler.cost, self.scheduler.units_per_layer
        budgets = []
        for length, per_layer in zip(plan_inputs.seq_lens.tolist(), plan_inputs.per_example_tokens(), strict=True):
            minimum = cost.min_budget(length, per_layer)
            ends = torch.tensor([max(low, minimum), max(high, minimum)], dtype=torch.float64)
            lengths = torch.tensor([length, length])
            per_layer_t = None if per_layer is None else torch.tensor([per_layer, per_layer])
            fewest, most = cost.units_for_budget(ends, lengths, units_per_layer, per_layer_t).tolist()
            units = int(torch.randint(fewest, most + 1, ()).item())
            budgets.append(cost.budget_for_units(units, length, units_per_layer, per_layer))
        return torch.tensor(budgets, device=plan_inputs.seq_lens.device)

    # --- what it cost ----------------------------------------------------------------------------------
    def full_flops(self, plan_inputs: PlanInputs) -> torch.Tensor:
        """[B] float64 prefill FLOPs of the full model on each request (same length, same token selection)."""
        cost = self.cost
        pairs = zip(plan_inputs.seq_lens.tolist(), plan_inputs.per_example_tokens(), strict=True)
        return torch.tensor([cost.full_flops(int(n), tokens) for n, tokens in pairs], dtype=torch.float64)

    def flops(self, plan: ExecutionPlan | None, plan_inputs: PlanInputs) -> torch.Tensor:
        """[B] float64 prefill FLOPs of each request under the plan (None: the full model)."""
        if plan is None:
            return self.full_flops(plan_inputs)
        return self.cost.plan_flops(plan, plan_inputs.seq_lens, plan_inputs.layer_tokens).double().cpu()

    def flops_fraction(self, plan: ExecutionPlan | None, plan_inputs: PlanInputs) -> torch.Tensor:
        """[B] float64 the plan's prefill FLOPs over the full model's on the same request."""
        return self.flops(plan, plan_inputs) / self.full_flops(plan_inputs)

    def _in_llm(self) -> bool:
        return self.token_selector is not None and self.token_selector.layer_index is not None
