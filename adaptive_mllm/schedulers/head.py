"""HeadScheduler (AdaLLaVA-H): switches attention head groups and MLP neuron groups inside layers.

Design (the reference supports plain multi-head attention only; this generalises it to GQA):

- **Groups.** Attention is selected by key/value group: one kv head and the ``q = num_heads /
  num_kv_heads`` query heads that read it, so grouped-query attention slices coherently (for MHA a
  group is one head). MLP neurons are split into ``num_heads`` contiguous groups, the first ``intermediate_size mod num_heads``
  one neuron wider when the width does not divide (Vicuna-13B: 13824 / 40), as the release splits them.
- **Logits.** One linear layer gives, per schedulable layer, ``num_kv_heads`` attention logits and
  ``num_heads`` MLP logits: ``L_sched * (num_kv_heads + num_heads)`` in all, which for MHA is the
  reference's ``L_sched * num_heads * 2`` (1024 for LLaVA-1.5-7B).
- **Unit.** ``rank`` query heads' worth of attention (``rank / q`` kv groups, so ``rank`` must be a
  multiple of ``q``) plus ``rank`` MLP groups, in one layer. A layer holds ``num_heads / rank`` units,
  all of the same cost, so a plan's FLOPs depend only on how many units it has per layer.
- **Picking one unit** (the release's rule, ``n_times_gumbel_softmax_head_version``): one pick over
  every still-unchosen element logit of every layer, attention and MLP alike (Gumbel noise / tau /
  straight-through in training, argmax in evaluation); the layer holding the picked element is the
  unit's layer. Then, inside that layer, the best ``rank / q`` remaining kv groups and the best
  ``rank`` remaining MLP groups (Gumbel top-r in training, top-r in evaluation), straight-through too.
  The unit adds ``layer one-hot x group mask`` to the plan, so gradients reach both the layer choice
  (the softmax mass of the layer's elements) and the group choice. A full layer has no element left,
  so it cannot be picked again.
- Repeated ``k`` times per example (``k`` from the cost model, examples may differ), vectorised over
  the batch: exactly ``k`` units, hence the budget, by construction. ``layer_mask`` marks the layers
  that keep anything.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.cost import BudgetRule
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.latency import LatencyEncoder
from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.schedulers.sampling import gumbel_top_r, top_k_mask


class HeadScheduler(Scheduler):
    """Switches units of ``rank`` heads' attention + ``rank`` MLP groups inside the schedulable layers.

    Args:
        num_prefix_layers: the first LLM layers, which always run.
        rank: query heads (and MLP groups) per unit; a multiple of ``num_heads / num_kv_heads`` that
            divides ``num_heads`` (8 in the reference release).
        tau: softmax temperature of the straight-through picks (5 in the reference release).
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
        release_checkpoint: a local AdaLLaVA-H release checkpoint directory (``ada_llava_llama``) whose trained
            scheduler this one starts from (schedulers/release.py).
    """

    release_type = "H"

    def __init__(
        self,
        num_prefix_layers: int,
        rank: int = 8,
        tau: float = 5.0,
        budget_rule: BudgetRule = "release",
        release_checkpoint: str | None = None,
    ) -> None:
        super().__init__(num_prefix_layers, budget_rule)
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0")
        self.rank = rank
        self.tau = tau
        self.release_checkpoint = release_checkpoint
        self.head: nn.Linear | None = None

    def _check_shape(self, shape: DecoderShape) -> None:
        q = shape.queries_per_kv
        if self.rank % q:
            raise ValueError(
                f"rank={self.rank} must be a multiple of queries per kv head ({shape.num_heads} heads / "
                f"{shape.num_kv_heads} kv heads = {q}): attention is switched by whole key/value groups"
            )
        if shape.num_heads % self.rank:
            raise ValueError(f"rank={self.rank} must divide num_heads={shape.num_heads}")
        if shape.intermediate_size < shape.num_heads:
            raise ValueError(
                f"intermediate_size={shape.intermediate_size} is smaller than num_heads={shape.num_heads}: some MLP groups would be empty"
            )

    def _build(self, shape: DecoderShape) -> None:
        layers = shape.num_layers - self.num_prefix_layers
        self.latency_encoder = LatencyEncoder(shape.hidden_size)
        self.head = nn.Linear(shape.hidden_size, layers * (shape.num_kv_heads + shape.num_heads))

    # --- units -------------------------------------------------------------------------------------
    @property
    def units_per_layer(self) -> int:
        return self.shape.num_heads // self.rank

    @property
    def kv_groups_per_unit(self) -> int:
        return self.rank // self.shape.queries_per_kv

    @property
    def mlp_groups_per_unit(self) -> int:
        return self.rank

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # [B, hidden]
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        if latency_hidden is None:
            raise ValueError("HeadScheduler reads the latency token's hidden state; got None")
        shape = self.shape
        k = self.units_for_budget(budgets, seq_lens, layer_tokens)  # [B]
        batch, layers = latency_hidden.shape[0], self.num_scheduled_layers
        kv, groups = shape.num_kv_heads, shape.num_heads
        logits = self.head(latency_hidden.to(self.head.weight.dtype)).float().view(batch, layers, kv + groups)
        attention_logits, mlp_logits = logits[..., :kv], logits[..., kv:]  # [B, L_s, G_kv], [B, L_s, G]

        k = k.to(logits.device)
        if not self.training and not torch.is_grad_enabled():  # inference: the same plan, without the loop
            attention_mask, mlp_mask = self._ranked_masks(attention_logits, mlp_logits, k)
        else:
            attention_mask, mlp_mask = self._greedy_masks(logits, k)
        layer_mask = ((attention_mask.detach().sum(-1) + mlp_mask.detach().sum(-1)) > 0.5).to(logits.dtype)  # [B, L_s]
        return ExecutionPlan(self.num_prefix_layers, layer_mask, attention_mask, mlp_mask, units=k)

    def _greedy_masks(self, logits: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit by unit, as the release: one pick over all remaining element logits gives the layer, then its
        best groups (Gumbel noise in training; straight-through gradients). logits: [B, L_s, G_kv + G]."""
        batch, layers, elements = logits.shape
        kv, groups = self.shape.num_kv_heads, self.shape.num_heads
        attention_logits, mlp_logits = logits[..., :kv], logits[..., kv:]  # [B, L_s, G_kv], [B, L_s, G]
        attention_mask = logits.new_zeros(batch, layers, kv)  # [B, L_s, G_kv]
        mlp_mask = logits.new_zeros(batch, layers, groups)  # [B, L_s, G]
        for unit in range(int(k.max()) if batch else 0):
            active = (unit < k).to(logits.dtype)  # [B]
            taken = torch.cat([attention_mask, mlp_mask], dim=-1).detach() > 0.5  # [B, L_s, G_kv + G]

            # the layer: the one holding the element picked among every remaining element of every layer
            remaining = logits.masked_fill(taken, float("-inf")).flatten(1)  # [B, L_s * (G_kv + G)]
            element = gumbel_top_r(remaining, 1, self.tau, self.training)  # [B, L_s * (G_kv + G)] one-hot
            layer = element.view(batch, layers, elements).sum(-1)  # [B, L_s] one-hot, straight-through

            # the groups inside it: logits and what is taken, read through the (straight-through) one-hot
            hard_layer = layer.detach()[..., None]  # [B, L_s, 1]
            attention_taken = (taken[..., :kv] * hard_layer).sum(1) > 0.5  # [B, G_kv]
            mlp_taken = (taken[..., kv:] * hard_layer).sum(1) > 0.5  # [B, G]
            layer_attention = (attention_logits * layer[..., None]).sum(1).masked_fill(attention_taken, float("-inf"))
            layer_mlp = (mlp_logits * layer[..., None]).sum(1).masked_fill(mlp_taken, float("-inf"))
            attention_pick = gumbel_top_r(layer_attention, self.kv_groups_per_unit, self.tau, self.training)  # [B, G_kv]
            mlp_pick = gumbel_top_r(layer_mlp, self.mlp_groups_per_unit, self.tau, self.training)  # [B, G]

            chosen_layer = layer * active[:, None]  # [B, L_s]
            attention_mask = attention_mask + chosen_layer[..., None] * attention_pick[:, None, :]
            mlp_mask = mlp_mask + chosen_layer[..., None] * mlp_pick[:, None, :]

        return attention_mask, mlp_mask

    def _ranked_masks(
        self,
        attention_logits: torch.Tensor,  # [B, L_s, G_kv]
        mlp_logits: torch.Tensor,  # [B, L_s, G]
        k: torch.Tensor,  # [B]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noiseless plan of :meth:`_greedy_masks`, computed at once instead of unit by unit.

        Without noise, a layer gives out its groups in descending logit order, ``r`` at a time, so what it
        offers for its ``j``-th unit (its largest remaining logit: ``max`` of the ``j r``-th sorted attention
        and MLP logits) is known beforehand and never rises with ``j``; other layers' picks do not change
        it. Picking the best offer ``k`` times is then taking the ``k`` best (layer, j) offers: one
        ranking, a few kernels, where the loop launches a dozen per unit."""
        units, per_kv, per_mlp = self.units_per_layer, self.kv_groups_per_unit, self.mlp_groups_per_unit
        batch, layers, kv = attention_logits.shape
        groups = mlp_logits.shape[-1]
        attention_sorted, attention_order = attention_logits.sort(dim=-1, descending=True, stable=True)
        mlp_sorted, mlp_order = mlp_logits.sort(dim=-1, descending=True, stable=True)
        offers = torch.maximum(attention_sorted[..., ::per_kv], mlp_sorted[..., ::per_mlp])  # [B, L_s, U]
        chosen = top_k_mask(offers.flatten(1), k).view(batch, layers, units).sum(-1)  # [B, L_s] units per layer
        slots = torch.arange(kv, device=k.device)
        attention_mask = torch.zeros_like(attention_logits).scatter_(
            -1, attention_order, (slots < chosen[..., None] * per_kv).to(attention_logits.dtype)
        )
        slots = torch.arange(groups, device=k.device)
        mlp_mask = torch.zeros_like(mlp_logits).scatter_(-1, mlp_order, (slots < chosen[..., None] * per_mlp).to(mlp_logits.dtype))
        return attention_mask, mlp_mask
