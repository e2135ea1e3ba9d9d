"""BudgetSweep: what validation / test measure at each budget besides the score.

Per budget: examples seen, mean FLOPs fraction (analytic, from the plans), mean units run, measured
prefill and per-token decode time; and the **plan usage**, i.e. how often each LLM layer (and, for head
plans, each key/value group) ran, per question kind. Usage is what the heatmaps show: a scheduler whose
plans adapt to content has different rows for different kinds at the same budget.

Sums are kept per process and added up across processes (``torch.distributed``) before they are read,
so multi-GPU evaluation reports the same numbers as one device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from adaptive_mllm.schedulers.plan import ExecutionPlan


@dataclass
class BudgetStats:
    """Sums over the examples (and batches) evaluated at one budget."""

    examples: float = 0.0
    batches: float = 0.0
    flops_fraction: float = 0.0  # sum over examples
    units: float = 0.0  # sum over examples
    prefill_seconds: float = 0.0  # sum over batches
    decode_seconds_per_token: float = 0.0  # sum over batches
    flops_vs_plain: float = 0.0  # sum over examples
    layer_usage: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L] sum of "layer ran"
    group_usage: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, G] sum of "group ran"
    kind_examples: dict[str, float] = field(default_factory=dict)  # kind -> examples


SUMMED = tuple(f.name for f in fields(BudgetStats) if isinstance(f.default, float))  # summed across processes by name


def layer_usage(plan: ExecutionPlan | None, num_layers: int, batch_size: int) -> torch.Tensor:
    """[B, L] 1 where the layer ran for the example (prefix layers, and every layer without a plan, always)."""
    usage = torch.ones(batch_size, num_layers)
    if plan is not None:
        usage[:, plan.num_prefix_layers :] = (plan.layer_mask.detach().float().cpu() > 0.5).float()
    return usage


def group_usage(plan: ExecutionPlan | None, layers: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[B, L, G] 1 where the key/value group ran, from the plan and its :func:`layer_usage` ``layers`` [B, L]
    (a running layer without a head mask runs every group)."""
    usage = layers[:, :, None].expand(-1, -1, num_groups).clone()
    if plan is not None and plan.head_mask is not None:
        usage[:, plan.num_prefix_layers :] *= (plan.head_mask.detach().float().cpu() > 0.5).float()
    return usage


class BudgetSweep:
    """Accumulates :class:`BudgetStats` per budget for one stage; :func:`summary_row` reads one budget's."""

    def __init__(self) -> None:
        self.stats: dict[float, BudgetStats] = {}

    def update(
        self,
        budget: float,
        question_kinds: list[str],
        flops_fraction: float,
        flops_vs_plain: float,
        units: float,
        prefill_seconds: float,
        decode_seconds_per_token: float,
        plan: ExecutionPlan | None,
        num_layers: int,
        num_groups: int,
    ) -> None:
        stats = self.stats.setdefault(budget, BudgetStats())
        batch = len(question_kinds)
        stats.examples += batch
        stats.batches += 1
        stats.flops_fraction += flops_fraction * batch
        stats.flops_vs_plain += flops_vs_plain * batch
        stats.units += units * batch
        stats.prefill_seconds += prefill_seconds
        stats.decode_seconds_per_token += decode_seconds_per_token
        layers = layer_usage(plan, num_layers, batch)  # [B, L]
        groups = group_usage(plan, layers, num_groups)  # [B, L, G]
        for row, kind in enumerate(question_kinds):
            stats.layer_usage[kind] = stats.layer_usage.get(kind, torch.zeros(num_layers)) + layers[row]
            stats.group_usage[kind] = stats.group_usage.get(kind, torch.zeros(num_layers, num_groups)) + groups[row]
            stats.kind_examples[kind] = stats.kind_examples.get(kind, 0.0) + 1

    # --- reading ---------------------------------------------------------------------------------------
    def synced(self, kinds: list[str], num_layers: int, num_groups: int) -> dict[float, BudgetStats]:
        """The stats summed over every process (identity on one process). ``kinds`` must be the same
        list on every rank (the datamodule's question kinds), so that the tensors line up."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.stats
        out = {}
        for budget in sorted(self.stats):  # every rank evaluates every budget
            stats = self.stats[budget]
            sums = [getattr(stats, name) for name in SUMMED]
            scalars = torch.tensor(sums + [stats.kind_examples.get(kind, 0.0) for kind in kinds], dtype=torch.float64)
            layers = torch.stack([stats.layer_usage.get(kind, torch.zeros(num_layers)) for kind in kinds]).double()
            groups = torch.stack(
                [stats.group_usage.get(kind, torch.zeros(num_layers, num_groups)) for kind in kinds]
            ).double()
            backend_device = _collective_device()
            for tensor in (scalars, layers, groups):
                moved = tensor.to(backend_device)
                dist.all_reduce(moved)
                tensor.copy_(moved.cpu())
            merged = BudgetStats(**dict(zip(SUMMED, scalars[: len(SUMMED)].tolist(), strict=True)))
            for index, kind in enumerate(kinds):
                if scalars[len(SUMMED) + index] > 0:
                    merged.kind_examples[kind] = float(scalars[len(SUMMED) + index])
                    merged.layer_usage[kind] = layers[index].float()
                    merged.group_usage[kind] = groups[index].float()
            out[budget] = merged
        return out


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def summary_row(stats: BudgetStats) -> dict[str, float]:
    """Means of one budget's stats: FLOPs fraction (of the full model with the same token selection, and of the
    plain full model: every image token in), units, prefill ms, decode ms per token."""
    examples, batches = max(stats.examples, 1.0), max(stats.batches, 1.0)
    return {
        "flops_fraction": stats.flops_fraction / examples,
        "flops_vs_plain": stats.flops_vs_plain / examples,
        "units": stats.units / examples,
        "prefill_ms": 1000 * stats.prefill_seconds / batches,
        "decode_ms_per_token": 1000 * stats.decode_seconds_per_token / batches,
    }


def usage_fractions(stats: BudgetStats) -> dict[str, torch.Tensor]:
    """kind -> [L] fraction of that kind's examples that ran each layer, plus ``overall``."""
    out = {kind: usage / stats.kind_examples[kind] for kind, usage in sorted(stats.layer_usage.items())}
    if stats.layer_usage:
        total = sum(stats.layer_usage.values())
        out["overall"] = total / sum(stats.kind_examples.values())
    return out


def group_fractions(stats: BudgetStats) -> torch.Tensor | None:
    """[L, G] fraction of all examples that ran each key/value group, or None before any update."""
    if not stats.group_usage:
        return None
    return sum(stats.group_usage.values()) / sum(stats.kind_examples.values())
