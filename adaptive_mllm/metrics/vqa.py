"""VQAv2 and TextVQA accuracy, each by its official rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from adaptive_mllm.metrics.answers import evalai_answer, normalize_answer
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

# Per-question scores are multiples of 1 / (3 n) for n human answers; counted in units of 1 / VQA_SCALE,
# exact for any n dividing 27720 (every n up to 12; VQAv2 and TextVQA have 10), as integers.
VQA_SCALE = 3 * 27720
VQA_RULES = ("vqav2", "textvqa")


def _leave_one_out(matches: int, humans: int) -> Fraction:
    """The mean over the ``humans`` subsets that leave one human out of min(#matching in the subset / 3,
    1): leaving out a human who gave the prediction leaves ``matches - 1``, another leaves ``matches``."""
    thirds = matches * min(3, matches - 1) + (humans - matches) * min(3, matches)
    return Fraction(thirds, 3 * humans)


def _vqav2_thirds(prediction: str, answers: Sequence[str]) -> Fraction:
    # LLaVA-1.5's convert_vqav2_for_submission.py: the generated text (stripped by model_vqa_loader)
    # through the EvalAI answer processor; that is the answer the evaluation server receives
    submitted = evalai_answer(prediction.strip())
    # vqaEval.py: newlines / tabs to spaces and strip on both sides; the punctuation and digit-article
    # steps only when the humans disagree (ten identical human answers are compared as they are)
    submitted = submitted.replace("\n", " ").replace("\t", " ").strip()
    humans = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(answer) for answer in humans]
        submitted = normalize_answer(submitted)
    return _leave_one_out(sum(answer == submitted for answer in humans), len(humans))


def _textvqa_thirds(prediction: str, answers: Sequence[str]) -> Fraction:
    # m4c_evaluator.py's TextVQAAccuracyEvaluator (LLaVA's eval_textvqa.py): the EvalAI answer
    # processor on the prediction and on each of exactly ten human answers, always
    if len(answers) != 10:
        raise ValueError(f"TextVQA's evaluator expects exactly 10 human answers, got {len(answers)}: {list(answers)!r:.120}")
    predicted = evalai_answer(prediction.strip())
    return _leave_one_out(sum(evalai_answer(answer) == predicted for answer in answers), len(answers))


def _vqa_thirds(prediction: str, answers: Sequence[str], rule: str) -> Fraction:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"expected a non-empty list of human answers, got {answers!r}")
    if rule == "vqav2":
        return _vqav2_thirds(prediction, answers)
    if rule == "textvqa":
        return _textvqa_thirds(prediction, answers)
    raise ValueError(f"unknown VQA rule {rule!r}; expected one of {VQA_RULES}")


def vqa_accuracy(prediction: str, answers: Sequence[str], rule: str = "vqav2") -> float:
    """The official accuracy of one generated answer against its human answers.

    ``"vqav2"``: LLaVA-1.5's submission conversion (EvalAI answer processor), then vqaEval.py's
    accuracy (normalisation only where the humans disagree). ``"textvqa"``: m4c_evaluator.py's
    TextVQA accuracy (EvalAI processor on both sides, exactly ten humans). Both average
    ``min(#matching humans / 3, 1)`` over the leave-one-out subsets of the humans.
    """
    return float(_vqa_thirds(prediction, answers, rule))


class VQAAccuracy(CountMetric):
    """VQAv2 / TextVQA accuracy, overall and per group (e.g. VQAv2's answer type), by the official
    rule named in ``rule`` (see :func:`vqa_accuracy`).

    Reads ``batch["all_answers"]`` (the human answers of each question, 10 in VQAv2 and TextVQA) and
    ``batch["question_kinds"]`` (the groups; one ``"all"`` group without them).
    """

    score: torch.Tensor
    total: torch.Tensor

    def __init__(self, groups: Sequence[str] | None = None, rule: str = "vqav2", **kwargs) -> None:
        super().__init__(**kwargs)
        if rule not in VQA_RULES:
            raise ValueError(f"unknown VQA rule {rule!r}; expected one of {VQA_RULES}")
        self.rule = rule
        self.groups = group_names(groups)
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("score", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        answers = batch_field(batch, "all_answers", self)
        groups = batch_kinds(batch, len(answers))
        check_batch(predictions=predictions, all_answers=answers, groups=groups)
        indices = group_indices(groups, self._index)
        score, total = [0] * len(self.groups), [0] * len(self.groups)
        for prediction, humans, index in zip(predictions, answers, indices, strict=True):
            score[index] += round(_vqa_thirds(prediction, humans, self.rule) * VQA_SCALE)
            total[index] += 1
        self.score += long_tensor(score, self.score)
        self.total += long_tensor(total, self.total)

    def question_scores(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[float]:
        """Each answer's accuracy (0, 1/3, 2/3 or 1 averaged over the leave-one-out subsets), as ``update`` sums it."""
        return [vqa_accuracy(p, humans, self.rule) for p, humans in zip(predictions, batch_field(batch, "all_answers", self), strict=True)]

    def compute(self) -> dict[str, torch.Tensor]:
        scale = self.total.new_tensor(VQA_SCALE)
        scores = {OVERALL: ratio(self.score.sum(), self.total.sum() * scale)}
        for group, index in self._index.items():
            if self.total[index] > 0:
                scores[group] = ratio(self.score[index], self.total[index] * scale)
        return scores
