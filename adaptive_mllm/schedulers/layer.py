"""LayerScheduler (AdaLLaVA-L): one logit per schedulable layer, keep the ``k`` the budget allows."""

from __future__ import annotations

import torch
from torch import nn

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.cost import BudgetRule
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.latency import LatencyEncoder
from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.schedulers.sampling import sample_k_of_n


class LayerScheduler(Scheduler):
    """Switches whole layers: a unit is one schedulable layer.

    Args:
        num_prefix_layers: the first LLM layers, which always run.
        tau: softmax temperature of the straight-through picks (5 in the reference release).
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
        release_checkpoint: a local AdaLLaVA-L release checkpoint directory (``ada_llava_llama``, e.g.
            zhuoyanxu/ada-llava-L-v1.5-7b) whose trained scheduler this one starts from (schedulers/release.py).
    """

    release_type = "L"

    def __init__(
        self, num_prefix_layers: int, tau: float = 5.0, budget_rule: BudgetRule = "release", release_checkpoint: str | None = None
    ) -> None:
        super().__init__(num_prefix_layers, budget_rule)
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0")
        self.tau = tau
        self.release_checkpoint = release_checkpoint
        self.head: nn.Linear | None = None

    def _build(self, shape: DecoderShape) -> None:
        self.latency_encoder = LatencyEncoder(shape.hidden_size)
        self.head = nn.Linear(shape.hidden_size, shape.num_layers - self.num_prefix_layers)

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # [B, hidden]
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        if latency_hidden is None:
            raise ValueError("LayerScheduler reads the latency token's hidden state; got None")
        k = self.units_for_budget(budgets, seq_lens, layer_tokens)  # [B]
        logits = self.head(latency_hidden.to(self.head.weight.dtype)).float()  # [B, L_sched]
        mask = sample_k_of_n(logits, k, self.tau, self.training)  # [B, L_sched]
        return ExecutionPlan(self.num_prefix_layers, mask, units=k)
