"""ScienceQA-IMG and MMBench: reading the chosen option from a generated answer, as each benchmark's
official script does, and their accuracies (MMBench's circular evaluation included)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptive_mllm.metrics.base import (
    OVERALL,
    UNPARSABLE,
    CountMetric,
    batch_field,
    batch_kinds,
    check_batch,
    concatenated,
    group_indices,
    group_names,
    long_tensor,
    ratio,
    stable_id,
)

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_RULES = ("scienceqa", "mmbench")
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
_SCIENCEQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py's pattern: "." is any character
# MMBench's can_infer_option: these marks become spaces before the answer is split into words
_MMBENCH_MARKS = ".()[],:;!*#{}"
# ... and an answer holding one of these phrases is a refusal (its option "Z": wrong)
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def scienceqa_letter(prediction: str, num_choices: int) -> str | None:
    """The option letter eval_science_qa.py (LLaVA-1.5) reads from a generated answer, None when it reads
    none (a wrong answer): the whole answer is one of A-E; or it starts with a letter, ". " and more
    ("B. cat"); or it holds exactly one "The answer is X" followed by any character. A letter past the
    question's options counts as none. "b", "(B)", "B.", "B)" and "The answer is B" (nothing after) read
    as none, as in the script.
    """
    text = prediction.strip()  # model_vqa_science strips the generated text
    if text in SCIENCEQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SCIENCEQA_SENTENCE.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SCIENCEQA_OPTIONS[:num_choices] else None


def mmbench_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter MMBench's answer matching without an LLM judge (``can_infer`` of
    open-compass/VLMEvalKit at commit 00b68452, 2024-12-24) reads from a generated answer, None when it reads none or
    the answer is a refusal (both wrong).

    First the letters: ``.()[],:;!*#{}`` become spaces, the answer is split into words, and if exactly one
    option letter is a word, that is the answer (so "A cat" reads as option A, as in MMBench). Else the
    option texts: if exactly one option's text (case-insensitive) is inside the answer, that option.
    """
    if isinstance(options, str):
        raise TypeError(f"options must be the list of option texts, not one string: {options!r}")
    letters = OPTION_LETTERS[: len(options)]
    text = str(prediction)
    if any(refusal in text for refusal in _MMBENCH_REFUSALS):
        return None
    spaced = text
    for mark in _MMBENCH_MARKS:
        spaced = spaced.replace(mark, " ")
    words = spaced.split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1:
        return named[0]
    if not named and "Z" in words:  # "Z": MMBench's "no option" answer
        return None
    lowered = text.lower()
    inside = [letter for letter, option in zip(letters, options, strict=True) if str(option).lower() in lowered]
    return inside[0] if len(inside) == 1 else None


class MultipleChoiceAccuracy(CountMetric):
    """Accuracy of the option letters read from generated answers, overall and per group, by the rule of
    the benchmark's official scorer: ``"scienceqa"`` (:func:`scienceqa_letter`, reads
    ``batch["num_choices"]``) or ``"mmbench"`` (:func:`mmbench_choice`, reads ``batch["options"]``, the
    option texts of each record in its order). Also reads ``batch["answers"]`` (the correct letters) and
    ``batch["question_kinds"]``. An answer from which no option is read is wrong and also counted under
    ``"unparsable"``.

    ``circular=True`` is MMBench's circular evaluation: the records of one question (its options shifted
    round, one record per shift) share ``batch["question_group"]``, and the question is right only if
    every shift is, and ``batch["circular_shift"]`` says which record is the question as first written (shift
    0). ``"overall"`` and the groups are then circular accuracies; ``"vanilla"`` is MMBench's vanilla accuracy,
    over the shift-0 records only (what a run with ``circular=False`` scores on the same answers).
    """

    correct: torch.Tensor
    total: torch.Tensor
    unparsable: torch.Tensor

    def __init__(self, groups: Sequence[str] | None = None, rule: str = "scienceqa", circular: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if rule not in CHOICE_RULES:
            raise ValueError(f"unknown multiple-choice rule {rule!r}; expected one of {CHOICE_RULES}")
        self.rule = rule
        self.groups = group_names(groups, reserved=(UNPARSABLE, "vanilla"))
        self.circular = circular
        self._index = {group: i for i, group in enumerate(self.groups)}
        size = len(self.groups)
        self.add_state("correct", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unparsable", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        if circular:  # one entry per record: its question's id, its group, whether it was right
            self.add_state("record_question", default=[], dist_reduce_fx="cat")
            self.add_state("record_group", default=[], dist_reduce_fx="cat")
            self.add_state("record_hit", default=[], dist_reduce_fx="cat")
            self.add_state("first_shift_correct", default=torch.tensor(0), dist_reduce_fx="sum")
            self.add_state("first_shift_total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _letters(self, predictions: Sequence[str], batch: Mapping[str, Any], size: int) -> list[str | None]:
        if self.rule == "mmbench":
            options = batch_field(batch, "options", self)
            if len(options) != size:
                raise ValueError(f"batch lengths differ: {size} answers, {len(options)} options")
            return [mmbench_choice(p, o) for p, o in zip(predictions, options, strict=True)]
        choices = batch_field(batch, "num_choices", self)
        if len(choices) != size:
            raise ValueError(f"batch lengths differ: {size} answers, {len(choices)} num_choices")
        return [scienceqa_letter(p, int(n)) for p, n in zip(predictions, choices, strict=True)]

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        references = batch_field(batch, "answers", self)
        size = len(references)
        groups = batch_kinds(batch, size)
        check_batch(predictions=predictions, answers=references, groups=groups)
        questions = batch_field(batch, "question_group", self) if self.circular else []
        shifts = batch_field(batch, "circular_shift", self) if self.circular else []
        if self.circular and (len(questions) != size or len(shifts) != size):
            raise ValueError(f"batch lengths differ: {size} answers, {len(questions)} question_group, {len(shifts)} circular_shift")
        indices = group_indices(groups, self._index)
        letters = self._letters(predictions, batch, size)
        correct, total, unparsable = ([0] * len(self.groups) for _ in range(3))
        hits = []
        for letter, reference, index in zip(letters, references, indices, strict=True):
            hit = int(letter is not None and letter == reference.strip().upper())
            hits.append(hit)
            correct[index] += hit
            total[index] += 1
            unparsable[index] += int(letter is None)
        self.correct += long_tensor(correct, self.correct)
        self.total += long_tensor(total, self.total)
        self.unparsable += long_tensor(unparsable, self.unparsable)
        if self.circular:
            self.record_question.append(long_tensor([stable_id(str(q)) for q in questions], self.correct))
            self.record_group.append(long_tensor(indices, self.correct))
            self.record_hit.append(long_tensor(hits, self.correct))
            first = [int(shift) == 0 for shift in shifts]
            self.first_shift_correct += sum(hit for hit, is_first in zip(hits, first, strict=True) if is_first)
            self.first_shift_total += sum(first)

    def compute(self) -> dict[str, torch.Tensor]:
        scores: dict[str, torch.Tensor] = {}
        if self.circular:
            question, group, hit = concatenated(self.record_question), concatenated(self.record_group), concatenated(self.record_hit)
            all_right: dict[int, bool] = {}
            question_group: dict[int, int] = {}
            for q, g, h in zip(question.tolist(), group.tolist(), hit.tolist(), strict=True):
                all_right[q] = all_right.get(q, True) and bool(h)
                question_group[q] = g
            right, asked = [0] * len(self.groups), [0] * len(self.groups)
            for q, ok in all_right.items():
                right[question_group[q]] += int(ok)
                asked[question_group[q]] += 1
            right_t, asked_t = torch.tensor(right), torch.tensor(asked)
            scores[OVERALL] = ratio(right_t.sum(), asked_t.sum())
            scores["vanilla"] = ratio(self.first_shift_correct, self.first_shift_total)
            for name, index in self._index.items():
                if asked[index] > 0:
                    scores[name] = ratio(right_t[index], asked_t[index])
        else:
            scores[OVERALL] = ratio(self.correct.sum(), self.total.sum())
            for name, index in self._index.items():
                if self.total[index] > 0:
                    scores[name] = ratio(self.correct[index], self.total[index])
        scores[UNPARSABLE] = self.unparsable.sum()
        return scores
