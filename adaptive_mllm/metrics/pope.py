"""POPE's accuracy, precision, recall, F1 and yes-ratio per split, as LLaVA-1.5's eval_pope.py computes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptive_mllm.metrics.base import (
    OVERALL,
    CountMetric,
    batch_field,
    batch_kinds,
    check_batch,
    group_indices,
    group_names,
    long_tensor,
    ratio,
)

POPE_SPLITS = ("adversarial", "popular", "random")
_POPE_PARTS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_answer(prediction: str) -> str:
    """"yes" or "no" as LLaVA-1.5's eval_pope.py reads a generated answer (stripped by model_vqa_loader):
    only the text before its first period counts, commas dropped; it is "no" if one of its words split
    on single spaces (not on newlines or tabs: "No\nthere" is one word) is "No", "no" or "not", else
    "yes" (so "NO", "Nope" and an empty answer count as yes)."""
    sentence = prediction.strip().split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(sentence.split(" ")) else "yes"


class POPEMetrics(CountMetric):
    """POPE's scores, "yes" being the positive class: accuracy, precision, recall, F1 and the fraction of
    "yes" answers, pooled and per group (``"{group}/f1"``; the groups are POPE's splits). ``"overall"``
    is the mean F1 over the groups seen, as LLaVA-1.5 reports POPE.

    Reads ``batch["answers"]`` (the labels, "yes" / "no") and ``batch["question_kinds"]``; predictions
    are read with :func:`pope_answer`.
    """

    counts: torch.Tensor  # [G, 4]: true positives, false positives, true negatives, false negatives

    def __init__(self, groups: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = group_names(groups, reserved=_POPE_PARTS)
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("counts", default=torch.zeros(len(self.groups), 4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        labels = [str(label).strip().lower() for label in batch_field(batch, "answers", self)]
        groups = batch_kinds(batch, len(labels))
        check_batch(predictions=predictions, answers=labels, groups=groups)
        bad = sorted({label for label in labels if label not in ("yes", "no")})
        if bad:
            raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
        indices = group_indices(groups, self._index)
        counts = [[0] * 4 for _ in self.groups]
        for prediction, label, index in zip(predictions, labels, indices, strict=True):
            said_yes, is_yes = pope_answer(prediction) == "yes", label == "yes"
            counts[index][(0 if is_yes else 1) if said_yes else (3 if is_yes else 2)] += 1
        self.counts += long_tensor(counts, self.counts)

    def question_scores(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[float]:
        """1 where the answer read by :func:`pope_answer` is the label, else 0 (POPE's accuracy per answer)."""
        labels = [str(label).strip().lower() for label in batch_field(batch, "answers", self)]
        return [float(pope_answer(p) == label) for p, label in zip(predictions, labels, strict=True)]

    @staticmethod
    def _parts(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        total = tp + fp + tn + fn
        return {
            "accuracy": ratio(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * tp, 2 * tp + fp + fn),  # = 2 P R / (P + R), 0 when there is no true positive
            "yes_ratio": ratio(tp + fp, total),
        }

    def compute(self) -> dict[str, torch.Tensor]:
        scores = dict(self._parts(*self.counts.sum(0)))
        f1s = []
        for group, index in self._index.items():
            if self.counts[index].sum() > 0:
                parts = self._parts(*self.counts[index])
                f1s.append(parts["f1"])
                scores.update({f"{group}/{name}": value for name, value in parts.items()})
        return {OVERALL: torch.stack(f1s).mean() if f1s else torch.tensor(0.0), **scores}
