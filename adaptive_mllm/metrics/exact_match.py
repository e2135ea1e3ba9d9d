"""Normalised exact match, overall and per group: the generic metric of the LLaVA-JSON datamodules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptive_mllm.metrics.answers import normalize_answer
from adaptive_mllm.metrics.base import (
    DEFAULT_GROUP,
    OVERALL,
    CountMetric,
    batch_field,
    batch_kinds,
    check_batch,
)


def _hits(predictions: Sequence[str], references: Sequence[str]) -> list[int]:
    return [int(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references, strict=True)]


class GroupedExactMatch(CountMetric):
    """Normalised exact match overall and per group (e.g. question kind).

    The groups are fixed in the constructor, so every process holds count vectors of the same shape and
    DDP's sum lines them up; growing them on the fly would let ranks disagree on the layout. An example
    of an unknown group is an error, never silently dropped. Without groups there is one, ``"all"``.

    ``compute()`` gives ``"overall"`` plus every group that saw at least one example (the accuracy of no
    example is undefined); after DDP's sync every rank sees the same groups.
    """

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, groups: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(groups, str):
            raise TypeError(f"groups must be a list of group names, not one string: {groups!r}")
        self.groups = [DEFAULT_GROUP] if groups is None else list(groups)
        if not self.groups:
            raise ValueError("GroupedExactMatch needs at least one group (or groups=None for one 'all' group)")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"duplicate group names: {self.groups}")
        if OVERALL in self.groups:
            raise ValueError(f"{OVERALL!r} is reserved for the accuracy over every group")
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("correct", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Mapping[str, Any],
        groups: Sequence[str] | None = None,
    ) -> None:
        """``references`` and ``groups`` are the reference answers and each example's group; or pass a
        collated batch as ``references`` (its ``"answers"`` and ``"question_kinds"`` are used)."""
        if isinstance(references, Mapping):
            batch = references
            references = batch_field(batch, "answers", self)
            if groups is None:
                groups = batch_kinds(batch, len(references))
        if groups is None:
            raise TypeError("GroupedExactMatch.update needs groups (or a batch with 'question_kinds')")
        check_batch(predictions=predictions, references=references, groups=groups)
        unknown = sorted(set(groups) - self._index.keys())
        if unknown:
            raise KeyError(f"unknown groups {unknown}; this metric was built for {self.groups}")
        # count on the host, then one addition per state: no device op per example
        correct = [0] * len(self.groups)
        total = [0] * len(self.groups)
        for hit, group in zip(self.hits(predictions, references), groups, strict=True):
            correct[self._index[group]] += hit
            total[self._index[group]] += 1
        self.correct += torch.tensor(correct, dtype=torch.long, device=self.correct.device)
        self.total += torch.tensor(total, dtype=torch.long, device=self.total.device)

    def hits(self, predictions: Sequence[str], references: Sequence[str]) -> list[int]:
        """1 for each prediction that matches its reference, else 0 (normalised exact match)."""
        return _hits(predictions, references)

    def question_scores(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[float]:
        """Each answer's score as ``update`` counts it (1 or 0): the ``score`` of the test's answers file."""
        return [float(hit) for hit in self.hits(predictions, batch_field(batch, "answers", self))]

    def compute(self) -> dict[str, torch.Tensor]:
        scores = {OVERALL: self.correct.sum().float() / self.total.sum().clamp(min=1).float()}
        for group, index in self._index.items():
            if self.total[index] > 0:
                scores[group] = self.correct[index].float() / self.total[index].float()
        return scores

    def counts(self) -> dict[str, int]:
        """Examples seen per group and ``"overall"``, summed over processes like ``compute()``."""
        with self.sync_context():
            total = self.total.tolist()
        return {OVERALL: sum(total), **{group: total[index] for group, index in self._index.items()}}
