"""MME's score per subtask (100 x (acc + acc+), acc+ over the questions about one image) and its perception and
cognition sums."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptive_mllm.metrics.base import (
    OVERALL,
    UNPARSABLE,
    CountMetric,
    batch_field,
    check_batch,
    concatenated,
    group_indices,
    group_names,
    long_tensor,
    stable_id,
)

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


def mme_answer(prediction: str) -> str | None:
    """"yes" / "no" as MME's calculation.py reads an answer (lower-cased: exactly "yes" or "no"; else
    "yes" if its first four characters hold "yes", else "no" if they hold "no"), None when it is neither
    (calculation.py's "other": a wrong answer)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


class MMEScore(CountMetric):
    """MME: per subtask, acc (per question) and acc+ (per image: every one of its questions, two in
    MME, right), score = 100 * (acc + acc+), out of 200; ``"perception"`` and ``"cognition"`` are the sums
    over their subtasks (the official lists :data:`MME_PERCEPTION`, :data:`MME_COGNITION`), ``"total"``
    both. ``"overall"`` is the perception score, the number LLaVA-1.5 (and AdaLLaVA) report as "MME".

    Reads ``batch["answers"]`` ("Yes" / "No"), ``batch["question_kinds"]`` (the subtask) and
    ``batch["image_id"]`` (pairs a subtask's questions about one image). Keys: ``"{subtask}"`` (score),
    ``"{subtask}/acc"``, ``"{subtask}/acc_plus"`` (fractions) for every subtask seen, and ``"unparsable"``.
    """

    unparsable: torch.Tensor

    def __init__(self, subtasks: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.subtasks = group_names(MME_SUBTASKS if subtasks is None else subtasks)
        unknown = sorted(set(self.subtasks) - set(MME_SUBTASKS))
        if unknown:
            raise ValueError(f"unknown MME subtasks {unknown}; the official ones are {list(MME_SUBTASKS)}")
        self._index = {subtask: i for i, subtask in enumerate(self.subtasks)}
        self.add_state("unparsable", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # one entry per question: its subtask, its image's id, whether it was right
        self.add_state("question_subtask", default=[], dist_reduce_fx="cat")
        self.add_state("question_image", default=[], dist_reduce_fx="cat")
        self.add_state("question_hit", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        labels = [str(label).strip().lower() for label in batch_field(batch, "answers", self)]
        subtasks = batch_field(batch, "question_kinds", self)
        images = batch_field(batch, "image_id", self)
        check_batch(predictions=predictions, answers=labels, question_kinds=subtasks, image_id=images)
        indices = group_indices(subtasks, self._index)
        parsed = [mme_answer(prediction) for prediction in predictions]
        self.unparsable += sum(answer is None for answer in parsed)
        like = self.unparsable
        self.question_subtask.append(long_tensor(indices, like))
        self.question_image.append(long_tensor([stable_id(f"{s}/{i}") for s, i in zip(subtasks, images, strict=True)], like))
        self.question_hit.append(long_tensor([int(a == label) for a, label in zip(parsed, labels, strict=True)], like))

    def compute(self) -> dict[str, torch.Tensor]:
        subtask, image, hit = concatenated(self.question_subtask), concatenated(self.question_image), concatenated(self.question_hit)
        questions = [0] * len(self.subtasks)
        right = [0] * len(self.subtasks)
        image_right: dict[tuple[int, int], bool] = {}
        for s, i, h in zip(subtask.tolist(), image.tolist(), hit.tolist(), strict=True):
            questions[s] += 1
            right[s] += h
            image_right[(s, i)] = image_right.get((s, i), True) and bool(h)
        images, images_right = [0] * len(self.subtasks), [0] * len(self.subtasks)
        for (s, _), ok in image_right.items():
            images[s] += 1
            images_right[s] += int(ok)
        scores: dict[str, torch.Tensor] = {}
        perception = cognition = 0.0
        for name, index in self._index.items():
            if questions[index] == 0:
                continue
            acc = right[index] / questions[index]
            acc_plus = images_right[index] / images[index]
            score = 100 * (acc + acc_plus)
            scores[name] = torch.tensor(score)
            scores[f"{name}/acc"] = torch.tensor(acc)
            scores[f"{name}/acc_plus"] = torch.tensor(acc_plus)
            if name in MME_PERCEPTION:
                perception += score
            else:
                cognition += score
        summary = {
            OVERALL: torch.tensor(perception),
            "perception": torch.tensor(perception),
            "cognition": torch.tensor(cognition),
            "total": torch.tensor(perception + cognition),
            UNPARSABLE: self.unparsable.clone(),
        }
        return {**summary, **scores}
