"""Answer metrics as torchmetrics Metrics: their states sum across processes, so DDP just works."""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "couldnt": "couldn't",
    "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't",
    "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "whats": "what's", "thats": "that's",
}  # fmt: skip
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """The answer normalisation of the official VQA evaluation script: punctuation, periods that are
    not decimal points, number words to digits, articles dropped, common contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    # punctuation: removed where glued to words, a space where it separates them
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


class ExactMatch(Metric):
    """Accuracy of normalised exact match."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        self.correct += sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class GroupedExactMatch(Metric):
    """Normalised exact match overall and per group (e.g. question kind).

    Groups must be known up front so that every process holds states of the same shape (DDP sums
    them); an unknown group is an error rather than a silently dropped example.
    """

    full_state_update = False

    def __init__(self, groups: list[str]) -> None:
        super().__init__()
        if not groups:
            raise ValueError("GroupedExactMatch needs at least one group")
        self.groups = list(groups)
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("correct", default=torch.zeros(len(self.groups)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.groups)), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str], groups: list[str]) -> None:
        if not len(predictions) == len(references) == len(groups):
            raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(groups)} groups")
        for prediction, reference, group in zip(predictions, references, groups):
            if group not in self._index:
                raise KeyError(f"unknown group {group!r}; known: {self.groups}")
            index = self._index[group]
            self.correct[index] += float(normalize_answer(prediction) == normalize_answer(reference))
            self.total[index] += 1.0

    def compute(self) -> dict[str, torch.Tensor]:
        scores = {"overall": self.correct.sum() / self.total.sum().clamp(min=1)}
        for group, index in self._index.items():
            if self.total[index] > 0:
                scores[group] = self.correct[index] / self.total[index]
        return scores
