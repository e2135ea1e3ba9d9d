"""ExecutionPlan: what runs in the schedulable layers, per example.

The first ``num_prefix_layers`` layers always run and are not part of the plan. For the
``num_layers - num_prefix_layers`` schedulable layers the plan holds 0/1 masks; in training they carry
straight-through gradients back to the scheduler, in inference the engine turns them into skipped
layers and sliced weights.

Head-level plans select attention by key/value group (``num_kv_heads`` per layer): a kept group keeps
its key/value head and all the query heads that read it, so grouped-query attention slices coherently
(for plain multi-head attention a group is one head). MLP neurons are split into ``num_mlp_groups``
contiguous groups; when the width does not divide (Vicuna-13B: 13824 neurons, 40 groups) the first
``width mod groups`` groups hold one neuron more, as the release's ``AdaLlamaMLP`` splits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptive_mllm.layers import mlp_group_sizes


@dataclass
class ExecutionPlan:
    num_prefix_layers: int
    layer_mask: torch.Tensor  # [B, L_sched]; 1 = the layer runs (at least partly)
    attention_mask: torch.Tensor | None = None  # [B, L_sched, num_kv_heads]; None = every group of a running layer
    mlp_mask: torch.Tensor | None = None  # [B, L_sched, num_mlp_groups]; None = the whole MLP of a running layer
    units: torch.Tensor | None = None  # [B] scheduler units switched on (for reports)

    @property
    def batch_size(self) -> int:
        return self.layer_mask.shape[0]

    @property
    def num_scheduled_layers(self) -> int:
        return self.layer_mask.shape[1]

    @property
    def is_head_level(self) -> bool:
        return self.attention_mask is not None or self.mlp_mask is not None

    def layer_runs(self, scheduled_index: int) -> torch.Tensor:
        """[B] bool: which examples run schedulable layer ``scheduled_index``."""
        return self.layer_mask[:, scheduled_index] > 0.5

    def to_host(self) -> ExecutionPlan:
        """A CPU copy, made in one transfer: the engine reads it for its per-layer decisions (which rows, which
        slices) without a device synchronisation per layer, which on a GPU would stall the launch queue."""
        if self.layer_mask.device.type == "cpu":
            return self
        pick = lambda t: None if t is None else t.cpu()  # noqa: E731
        return ExecutionPlan(
            self.num_prefix_layers, pick(self.layer_mask), pick(self.attention_mask), pick(self.mlp_mask), pick(self.units)
        )

    def select(self, rows: torch.Tensor) -> ExecutionPlan:
        """The plan of a subset of the batch (rows: index tensor)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return ExecutionPlan(
            self.num_prefix_layers, self.layer_mask[rows], pick(self.attention_mask), pick(self.mlp_mask), pick(self.units)
        )

    @staticmethod
    def full(batch_size: int, num_layers: int, num_prefix_layers: int, device: torch.device | None = None) -> ExecutionPlan:
        mask = torch.ones(batch_size, num_layers - num_prefix_layers, device=device)
        return ExecutionPlan(num_prefix_layers, mask)


# --- MLP groups ------------------------------------------------------------------------------------
def widen_mlp_mask(mask: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """[b, G] group mask -> [b, I] neuron mask (each group's value repeated over its neurons; gradients pass)."""
    width, remainder = divmod(intermediate_size, mask.shape[-1])
    if remainder == 0:
        return mask.repeat_interleave(width, dim=-1)
    sizes = torch.tensor(mlp_group_sizes(intermediate_size, mask.shape[-1]), device=mask.device)
    return mask.repeat_interleave(sizes, dim=-1, output_size=intermediate_size)  # output_size: no device sync


def mlp_group_neurons(keep: torch.Tensor, intermediate_size: int, num_groups: int) -> torch.Tensor:
    """[n] kept group indices (ascending) -> the indices of their neurons, ascending, on ``keep``'s device.

    Equal groups are plain arithmetic; uneven ones need the count of kept wide groups, one small device
    synchronisation per sliced pattern of a prefill."""
    width, remainder = divmod(intermediate_size, num_groups)
    if remainder == 0:
        return (keep[:, None] * width + torch.arange(width, device=keep.device)).flatten()
    sizes = torch.tensor(mlp_group_sizes(intermediate_size, num_groups), device=keep.device)
    owner = torch.arange(num_groups, device=keep.device).repeat_interleave(sizes)  # [I] group of each neuron
    kept = torch.zeros(num_groups, dtype=torch.bool, device=keep.device)
    kept[keep] = True
    return kept[owner].nonzero().flatten()
