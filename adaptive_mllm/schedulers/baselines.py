"""Baselines a paper compares against: the full model, random layers, and a fixed set of layers.

Random and Static keep the same number of layers as :class:`~adaptive_mllm.schedulers.layer.LayerScheduler`
for the same budget, so they meet it too. None of them reads the latency token, but with
``insert_latency_token: true`` they still insert it, from a latency encoder loaded with the checkpoint: a model
trained with AdaLLaVA-L is then evaluated on exactly its training inputs with only the choice of layers
changed, which is the comparison that isolates the learned scheduler. The token encodes the budget in the units
of the scheduler the checkpoint was trained with (head units for AdaLLaVA-H: the module reads them from the
checkpoint), so it is the very token that scheduler inserted::

    adaptive-mllm test --config recipes/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \
        --model.scheduler=StaticScheduler --model.scheduler.num_prefix_layers=1 \
        --model.scheduler.insert_latency_token=true
"""

from __future__ import annotations

import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.cost import BudgetRule
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.latency import LatencyEncoder
from adaptive_mllm.schedulers.plan import ExecutionPlan


class BaselineScheduler(Scheduler):
    """A scheduler whose plan follows a rule; it may still insert a (loaded) latency token.

    Args:
        num_prefix_layers: the first LLM layers, which always run.
        insert_latency_token: insert the latency token, as the model being evaluated was trained with.
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
    """

    def __init__(self, num_prefix_layers: int, insert_latency_token: bool = False, budget_rule: BudgetRule = "release") -> None:
        super().__init__(num_prefix_layers, budget_rule)
        self.insert_latency_token = insert_latency_token
        self._trained: Scheduler | None = None  # the checkpoint's scheduler, when it counted budgets in other units

    def _build(self, shape: DecoderShape) -> None:
        if self.insert_latency_token:
            self.latency_encoder = LatencyEncoder(shape.hidden_size)

    def encode_budget_like(self, trained: Scheduler) -> None:
        """Let the latency token encode each budget as ``trained`` did in training (AdaLLaVA-H counts head units,
        one layer 4 of them in tiny-h): the loaded encoder then gets the very inputs it learned from, whichever
        layers this plan keeps. ``trained`` only computes numbers; its weights are not kept."""
        trained.configure(self.shape)
        object.__setattr__(self, "_trained", trained)  # not a sub-module: its plan head stays out of the state dict

    def latency_value(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor:
        if self._trained is None:
            return super().latency_value(budgets, seq_lens, layer_tokens)
        try:
            return self._trained.latency_value(budgets, seq_lens, layer_tokens)
        except ValueError as error:  # a budget this plan can meet, but below any the trained scheduler saw
            raise ValueError(
                f"the latency token encodes budgets as the checkpoint's {type(self._trained).__name__} "
                f"({self._trained.num_prefix_layers} always-run layers) did, and it has no token for this one: {error}. "
                "Evaluate without insert_latency_token, or at budgets it admits"
            ) from None


class FullScheduler(BaselineScheduler):
    """Every layer runs, whatever the budget (its cost is that of budget 1.0).

    Args:
        num_prefix_layers: where the (trivial) plan starts; any value in [0, L) gives the same model.
        insert_latency_token: insert the latency token, as the model being evaluated was trained with.
    """

    def check_budgets(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> None:
        """Any budget is accepted: the full model runs regardless."""

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # ignored
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        batch = budgets.shape[0]
        plan = ExecutionPlan.full(batch, self.shape.num_layers, self.num_prefix_layers, device=budgets.device)
        plan.units = torch.full((batch,), self.num_units, dtype=torch.long, device=budgets.device)
        return plan


class RandomScheduler(BaselineScheduler):
    """``k`` schedulable layers chosen uniformly at random per example (``k`` as for AdaLLaVA-L).

    Plans come from the scheduler's own generator, seeded once: the same sequence of calls gives the
    same plans from run to run, whatever else draws random numbers.

    Args:
        num_prefix_layers: the first LLM layers, which always run.
        seed: seed of the generator.
        insert_latency_token: insert the latency token, as the model being evaluated was trained with.
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
    """

    def __init__(
        self, num_prefix_layers: int, seed: int = 0, insert_latency_token: bool = False, budget_rule: BudgetRule = "release"
    ) -> None:
        super().__init__(num_prefix_layers, insert_latency_token, budget_rule)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # ignored
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        k = self.units_for_budget(budgets, seq_lens, layer_tokens)  # [B]
        noise = torch.rand(budgets.shape[0], self.num_scheduled_layers, generator=self.generator)  # [B, L_sched], CPU
        rank = noise.argsort(dim=-1).argsort(dim=-1)  # [B, L_sched]: position of each layer in a random order
        mask = (rank < k.cpu()[:, None]).float().to(budgets.device)
        return ExecutionPlan(self.num_prefix_layers, mask, units=k)


class StaticScheduler(BaselineScheduler):
    """Keeps the first ``k`` schedulable layers (``k`` as for AdaLLaVA-L): the last layers are off.

    Args:
        num_prefix_layers: the first LLM layers, which always run.
        insert_latency_token: insert the latency token, as the model being evaluated was trained with.
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
    """

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # ignored
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        k = self.units_for_budget(budgets, seq_lens, layer_tokens)  # [B]
        index = torch.arange(self.num_scheduled_layers, device=k.device)  # [L_sched]
        mask = (index[None, :] < k[:, None]).float()  # [B, L_sched]
        return ExecutionPlan(self.num_prefix_layers, mask, units=k)
