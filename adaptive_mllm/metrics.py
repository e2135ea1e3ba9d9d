"""Answer metrics as torchmetrics Metrics: their states are count tensors of fixed shape that sum across
processes, so DDP just works.

Answers are compared after the normalisation of the official VQA evaluation script
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), so that "Yes." and "yes", or
"two" and "2", count as the same answer.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torchmetrics import Metric

OVERALL = "overall"  # the key of the accuracy over every example
DEFAULT_GROUP = "all"  # the one group of GroupedExactMatch when no groups are given

# --- VQA answer normalisation ---------------------------------------------------------------------
# The tables below are those of vqaEval.py, verbatim. Its capitalised contraction keys ("Im", "Ive",
# "Id've") never match, because words are lower-cased before the look-up; kept so scores match the script.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# vqaEval.py's pattern, verbatim: "(?!<=\d)" is a lookahead, not a lookbehind, so in effect a period is
# removed unless a digit follows it ("2.5" and ".5" keep theirs, "3." and "yes." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation: a mark touching a space (or any mark, once the answer holds a
    digit grouping like "1,000") is deleted; a mark inside a word becomes a space ("black-white")."""
    out = text
    glued_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # the script tests the answer as it came in, not as earlier marks left it
        if mark + " " in text or " " + mark in text or glued_digits:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower-case, number words to digits, articles dropped,
    contractions restored, whitespace collapsed."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation script compares it.

    Unlike the script, which normalises only when the human answers disagree, this always normalises:
    there is one reference per question here, and a normalised comparison is the fair one.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _check_batch(**named: Sequence[str]) -> None:
    """A lone string is a sequence of characters: refuse it instead of scoring each character."""
    for name, value in named.items():
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of strings, not one string: {value!r}")
    lengths = {name: len(value) for name, value in named.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch lengths differ: {lengths}")


def _hits(predictions: Sequence[str], references: Sequence[str]) -> list[int]:
    return [int(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references, strict=True)]


# --- metrics --------------------------------------------------------------------------------------
class _CountMetric(Metric):
    """Shared by the metrics below: integer counts summed over processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def merge_state(self, incoming_state: dict[str, torch.Tensor] | Metric) -> None:
        """torchmetrics' merge, which (1.9) keeps a ``compute()`` cached before it: drop that stale value."""
        super().merge_state(incoming_state)
        self._computed = None


class ExactMatch(_CountMetric):
    """Accuracy of normalised exact match; 0 before any example (torchmetrics' convention)."""

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # integer counts: exact at any size, and untouched by precision casts of the LightningModule
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        _check_batch(predictions=predictions, references=references)
        self.correct += sum(_hits(predictions, references))
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class GroupedExactMatch(_CountMetric):
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

    def update(self, predictions: Sequence[str], references: Sequence[str], groups: Sequence[str]) -> None:
        _check_batch(predictions=predictions, references=references, groups=groups)
        unknown = sorted(set(groups) - self._index.keys())
        if unknown:
            raise KeyError(f"unknown groups {unknown}; this metric was built for {self.groups}")
        # count on the host, then one addition per state: no device op per example
        correct = [0] * len(self.groups)
        total = [0] * len(self.groups)
        for hit, group in zip(_hits(predictions, references), groups, strict=True):
            correct[self._index[group]] += hit
            total[self._index[group]] += 1
        self.correct += torch.tensor(correct, dtype=torch.long, device=self.correct.device)
        self.total += torch.tensor(total, dtype=torch.long, device=self.total.device)

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


# --- majority-answer baseline ---------------------------------------------------------------------
def majority_answers(answers: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """The most common normalised answer per group (ties: alphabetically first, so runs agree)."""
    _check_batch(answers=answers, groups=groups)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for answer, group in zip(answers, groups, strict=True):
        counts[group][normalize_answer(answer)] += 1
    return {group: min(counter.items(), key=lambda item: (-item[1], item[0]))[0] for group, counter in sorted(counts.items())}


def majority_baseline_accuracy(majority: dict[str, str], references: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    """Accuracy per group and ``"overall"`` of answering every question with its group's majority answer:
    the floor a model must beat to show it looks at the image. A group with no majority answer scores 0."""
    _check_batch(references=references, groups=groups)
    if OVERALL in groups:
        raise ValueError(f"{OVERALL!r} is reserved for the accuracy over every group")
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for reference, group in zip(references, groups, strict=True):
        guess = majority.get(group)
        hit = int(guess is not None and normalize_answer(guess) == normalize_answer(reference))
        for key in (OVERALL, group):
            correct[key] += hit
            total[key] += 1
    return {key: correct[key] / total[key] for key in total}
