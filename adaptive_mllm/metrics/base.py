"""What every metric of this package shares: the report's reserved keys, integer count states that sum (or
concatenate) across processes, and reading per-record fields from a collated batch."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

OVERALL = "overall"  # the key of the accuracy over every example
# A test report's row holds the scores by group beside these columns: a question kind named like one would overwrite it.
REPORT_COLUMNS = ("budget", "flops_fraction", "flops_vs_plain", "units", "prefill_ms", "decode_ms_per_token", "questions", "skipped_records")
RESERVED_GROUPS = (OVERALL, *REPORT_COLUMNS)
DEFAULT_GROUP = "all"  # the one group of GroupedExactMatch when no groups are given


def check_batch(**named: Sequence[str]) -> None:
    """A lone string is a sequence of characters: refuse it instead of scoring each character."""
    for name, value in named.items():
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of strings, not one string: {value!r}")
    lengths = {name: len(value) for name, value in named.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch lengths differ: {lengths}")


class CountMetric(Metric):
    """The base of every metric here: integer counts summed over processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def merge_state(self, incoming_state: dict[str, torch.Tensor] | Metric) -> None:
        """torchmetrics' merge, which (1.9) keeps a ``compute()`` cached before it: drop that stale value."""
        super().merge_state(incoming_state)
        self._computed = None


UNPARSABLE = "unparsable"  # predictions from which no answer could be read (they count as wrong)


def batch_field(batch: Mapping[str, Any], name: str, metric: object) -> list:
    """``batch[name]`` as a list, or a KeyError saying which datamodule field the metric needs."""
    if name not in batch:
        raise KeyError(
            f"{type(metric).__name__} needs batch[{name!r}] (a per-record field of the benchmark datamodule); "
            f"the batch has {sorted(batch)}"
        )
    value = batch[name]
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def batch_kinds(batch: Mapping[str, Any], size: int) -> list[str]:
    """The batch's question kinds (the groups of a grouped score); one default group if it has none."""
    return list(batch["question_kinds"]) if "question_kinds" in batch else [DEFAULT_GROUP] * size


def group_names(groups: Sequence[str] | None, reserved: Sequence[str] = ()) -> list[str]:
    """Validated group names (fixed at construction so that every rank's states line up)."""
    if isinstance(groups, str):
        raise TypeError(f"groups must be a list of group names, not one string: {groups!r}")
    names = [DEFAULT_GROUP] if groups is None else list(groups)
    if not names:
        raise ValueError("at least one group is needed (or groups=None for one 'all' group)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate group names: {names}")
    clash = sorted({OVERALL, *reserved} & set(names))
    if clash:
        raise ValueError(f"group names {clash} are reserved for the metric's own keys")
    return names


def group_indices(groups: Sequence[str], index: Mapping[str, int]) -> list[int]:
    unknown = sorted(set(groups) - index.keys())
    if unknown:
        raise KeyError(f"unknown groups {unknown}; this metric was built for {list(index)}")
    return [index[group] for group in groups]


def stable_id(key: str) -> int:
    """A 64-bit id of a string, equal on every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def concatenated(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A concatenated list state (a list of tensors before a sync, one tensor after)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as float, 0 where the denominator is 0 (no example, no score)."""
    return numerator.double().div(denominator.double().clamp(min=1)).float()


def long_tensor(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)
