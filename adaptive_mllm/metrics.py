"""Answer metrics as torchmetrics Metrics: their states are count tensors of fixed shape that sum across
processes, so DDP just works.

Answers are compared after the normalisation of the official VQA evaluation script
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), so that "Yes." and "yes", or
"two" and "2", count as the same answer.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

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
            references = _field(batch, "answers", self)
            if groups is None:
                groups = _kinds(batch, len(references))
        if groups is None:
            raise TypeError("GroupedExactMatch.update needs groups (or a batch with 'question_kinds')")
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


# --- benchmark metrics ----------------------------------------------------------------------------
# Every metric below has the interface of the benchmark datamodules (adaptive_mllm.data.benchmarks):
# ``update(predictions, batch)`` with the generated answers and the collated batch (each metric reads
# the per-record fields it needs from it), and ``compute() -> dict[str, Tensor]`` with the headline
# score under ``"overall"`` beside its parts. States are integer tensors summed over processes, or, where
# examples must be regrouped (MME's image pairs, MMBench's circular shifts), integer lists concatenated
# over processes: DDP gives every rank the same result.
UNPARSABLE = "unparsable"  # predictions from which no answer could be read (they count as wrong)


def _field(batch: Mapping[str, Any], name: str, metric: object) -> list:
    """``batch[name]`` as a list, or a KeyError saying which datamodule field the metric needs."""
    if name not in batch:
        raise KeyError(
            f"{type(metric).__name__} needs batch[{name!r}] (a per-record field of the benchmark datamodule); "
            f"the batch has {sorted(batch)}"
        )
    value = batch[name]
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _kinds(batch: Mapping[str, Any], size: int) -> list[str]:
    """The batch's question kinds (the groups of a grouped score); one default group if it has none."""
    return list(batch["question_kinds"]) if "question_kinds" in batch else [DEFAULT_GROUP] * size


def _group_names(groups: Sequence[str] | None, reserved: Sequence[str] = ()) -> list[str]:
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


def _group_indices(groups: Sequence[str], index: Mapping[str, int]) -> list[int]:
    unknown = sorted(set(groups) - index.keys())
    if unknown:
        raise KeyError(f"unknown groups {unknown}; this metric was built for {list(index)}")
    return [index[group] for group in groups]


def _stable_id(key: str) -> int:
    """A 64-bit id of a string, equal on every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _cat(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A concatenated list state (a list of tensors before a sync, one tensor after)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as float, 0 where the denominator is 0 (no example, no score)."""
    return numerator.double().div(denominator.double().clamp(min=1)).float()


def _long(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)


# VQA accuracy -------------------------------------------------------------------------------------
# Per-question scores are multiples of 1 / (3 n) for n human answers; counted in units of 1 / VQA_SCALE,
# exact for any n dividing 27720 (every n up to 12; VQAv2 and TextVQA have 10), as integers.
VQA_SCALE = 3 * 27720


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against its human answers (normalised as
    :func:`normalize_answer`): over the n leave-one-out subsets of n - 1 humans, the mean of
    ``min(#humans in the subset that gave the prediction / 3, 1)``."""
    return float(_vqa_thirds(prediction, answers))


def _vqa_thirds(prediction: str, answers: Sequence[str]) -> Fraction:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"expected a non-empty list of human answers, got {answers!r}")
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in answers)
    # leaving out a human who gave the prediction leaves matches - 1 of them, leaving out another leaves all
    thirds = matches * min(3, matches - 1) + (len(answers) - matches) * min(3, matches)
    return Fraction(thirds, 3 * len(answers))


class VQAAccuracy(_CountMetric):
    """VQAv2 / TextVQA accuracy, overall and per group (e.g. VQAv2's answer type).

    Reads ``batch["all_answers"]`` (the human answers of each question, 10 in VQAv2 and TextVQA) and
    ``batch["question_kinds"]`` (the groups; one ``"all"`` group without them). Unlike vqaEval.py, which
    normalises only when the humans disagree, answers are always normalised (see :func:`normalize_answer`).
    """

    score: torch.Tensor
    total: torch.Tensor

    def __init__(self, groups: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = _group_names(groups)
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("score", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        answers = _field(batch, "all_answers", self)
        groups = _kinds(batch, len(answers))
        _check_batch(predictions=predictions, all_answers=answers, groups=groups)
        indices = _group_indices(groups, self._index)
        score, total = [0] * len(self.groups), [0] * len(self.groups)
        for prediction, humans, index in zip(predictions, answers, indices, strict=True):
            score[index] += round(_vqa_thirds(prediction, humans) * VQA_SCALE)
            total[index] += 1
        self.score += _long(score, self.score)
        self.total += _long(total, self.total)

    def compute(self) -> dict[str, torch.Tensor]:
        scale = self.total.new_tensor(VQA_SCALE)
        scores = {OVERALL: _ratio(self.score.sum(), self.total.sum() * scale)}
        for group, index in self._index.items():
            if self.total[index] > 0:
                scores[group] = _ratio(self.score[index], self.total[index] * scale)
        return scores


# multiple choice ----------------------------------------------------------------------------------
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_ONLY = re.compile(r"\(?([A-Za-z])\)?[.:]?")  # "B", "b", "B.", "(B)", "B)"
_LETTER_LEADS = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)])(?:\s|$)")  # "(B) cat", "B. cat", "B) cat", "B: cat"
# "the answer is B", "Answer: (B)", "option B.": the letter must end there (or be in brackets), so that the
# article in "the answer is A cat" is never read as option A
_LETTER_NAMED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*(?:\(([A-Z])\)|([A-Z])(?=$|[\s.,;:!?]*$|[.,;:!?)]))")


def parse_option_letter(prediction: str, num_choices: int = len(OPTION_LETTERS)) -> str | None:
    """The option letter a free-form answer gives, or None when it gives none of the first ``num_choices``.

    Read, in this order: the whole answer is one letter ("B", "b", "B.", "(B)"); the answer starts with a
    marked letter ("B. cat", "(B) cat", "B) cat"); the letter follows "answer", "option" or "choice"
    ("The answer is B", "Answer: (B)"). An unmarked leading capital ("A cat") is an article, not option A;
    a letter past the options counts as no letter.
    """
    text = prediction.strip()
    match = _LETTER_ONLY.fullmatch(text) or _LETTER_LEADS.match(text) or _LETTER_NAMED.search(text)
    if match is None:
        return None
    letter = next(group for group in match.groups() if group).upper()
    return letter if OPTION_LETTERS.index(letter) < num_choices else None


class MultipleChoiceAccuracy(_CountMetric):
    """Accuracy of option letters read from free-form answers (ScienceQA, MMBench), overall and per group.

    Reads ``batch["answers"]`` (the correct letters), ``batch["num_choices"]`` (optional: letters past it
    are not options) and ``batch["question_kinds"]``. An answer with no option letter
    (:func:`parse_option_letter`) is wrong and also counted under ``"unparsable"``.

    ``circular=True`` is MMBench's circular evaluation: the records of one question (its options shifted
    round, one record per shift) share ``batch["question_group"]``, and the question is right only if
    every shift is. ``"overall"`` and the groups are then circular accuracies; ``"vanilla"`` is the
    accuracy over single records.
    """

    correct: torch.Tensor
    total: torch.Tensor
    unparsable: torch.Tensor

    def __init__(self, groups: Sequence[str] | None = None, circular: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = _group_names(groups, reserved=(UNPARSABLE, "vanilla"))
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

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        references = _field(batch, "answers", self)
        size = len(references)
        choices = _field(batch, "num_choices", self) if "num_choices" in batch else [len(OPTION_LETTERS)] * size
        groups = _kinds(batch, size)
        _check_batch(predictions=predictions, answers=references, groups=groups)
        if len(choices) != size:
            raise ValueError(f"batch lengths differ: {size} answers, {len(choices)} num_choices")
        questions = _field(batch, "question_group", self) if self.circular else []
        if self.circular and len(questions) != size:
            raise ValueError(f"batch lengths differ: {size} answers, {len(questions)} question_group")
        indices = _group_indices(groups, self._index)
        correct, total, unparsable = ([0] * len(self.groups) for _ in range(3))
        hits = []
        for prediction, reference, num_choices, index in zip(predictions, references, choices, indices, strict=True):
            letter = parse_option_letter(prediction, int(num_choices))
            hit = int(letter is not None and letter == reference.strip().upper())
            hits.append(hit)
            correct[index] += hit
            total[index] += 1
            unparsable[index] += int(letter is None)
        self.correct += _long(correct, self.correct)
        self.total += _long(total, self.total)
        self.unparsable += _long(unparsable, self.unparsable)
        if self.circular:
            self.record_question.append(_long([_stable_id(str(q)) for q in questions], self.correct))
            self.record_group.append(_long(indices, self.correct))
            self.record_hit.append(_long(hits, self.correct))

    def compute(self) -> dict[str, torch.Tensor]:
        scores: dict[str, torch.Tensor] = {}
        if self.circular:
            question, group, hit = _cat(self.record_question), _cat(self.record_group), _cat(self.record_hit)
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
            scores[OVERALL] = _ratio(right_t.sum(), asked_t.sum())
            scores["vanilla"] = _ratio(self.correct.sum(), self.total.sum())
            for name, index in self._index.items():
                if asked[index] > 0:
                    scores[name] = _ratio(right_t[index], asked_t[index])
        else:
            scores[OVERALL] = _ratio(self.correct.sum(), self.total.sum())
            for name, index in self._index.items():
                if self.total[index] > 0:
                    scores[name] = _ratio(self.correct[index], self.total[index])
        scores[UNPARSABLE] = self.unparsable.sum()
        return scores


# POPE ---------------------------------------------------------------------------------------------
POPE_SPLITS = ("adversarial", "popular", "random")
_POPE_PARTS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_answer(prediction: str) -> str:
    """"yes" or "no" as the POPE evaluation (and LLaVA's eval_pope.py) reads an answer: only its first
    sentence counts, commas dropped; it is "no" if one of its space-separated words is "No", "no" or
    "not", else "yes" (so an answer that is neither still counts, as yes)."""
    sentence = prediction.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(sentence.split()) else "yes"


class POPEMetrics(_CountMetric):
    """POPE's scores, "yes" being the positive class: accuracy, precision, recall, F1 and the fraction of
    "yes" answers, pooled and per group (``"{group}/f1"``; the groups are POPE's splits). ``"overall"``
    is the mean F1 over the groups seen, as LLaVA-1.5 reports POPE.

    Reads ``batch["answers"]`` (the labels, "yes" / "no") and ``batch["question_kinds"]``; predictions
    are read with :func:`pope_answer`.
    """

    counts: torch.Tensor  # [G, 4]: true positives, false positives, true negatives, false negatives

    def __init__(self, groups: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = _group_names(groups, reserved=_POPE_PARTS)
        self._index = {group: i for i, group in enumerate(self.groups)}
        self.add_state("counts", default=torch.zeros(len(self.groups), 4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        labels = [str(label).strip().lower() for label in _field(batch, "answers", self)]
        groups = _kinds(batch, len(labels))
        _check_batch(predictions=predictions, answers=labels, groups=groups)
        bad = sorted({label for label in labels if label not in ("yes", "no")})
        if bad:
            raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
        indices = _group_indices(groups, self._index)
        counts = [[0] * 4 for _ in self.groups]
        for prediction, label, index in zip(predictions, labels, indices, strict=True):
            said_yes, is_yes = pope_answer(prediction) == "yes", label == "yes"
            counts[index][(0 if is_yes else 1) if said_yes else (3 if is_yes else 2)] += 1
        self.counts += _long(counts, self.counts)

    @staticmethod
    def _parts(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        total = tp + fp + tn + fn
        return {
            "accuracy": _ratio(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),  # = 2 P R / (P + R), 0 when there is no true positive
            "yes_ratio": _ratio(tp + fp, total),
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


# MME ----------------------------------------------------------------------------------------------
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


def mme_answer(prediction: str) -> str | None:
    """"yes" / "no" as MME's calculation.py reads an answer (lower-cased: exactly "yes" or "no", else
    the first of them found in its first four characters), None when it is neither (a wrong answer)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


class MMEScore(_CountMetric):
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
        self.subtasks = _group_names(MME_SUBTASKS if subtasks is None else subtasks)
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
        labels = [str(label).strip().lower() for label in _field(batch, "answers", self)]
        subtasks = _field(batch, "question_kinds", self)
        images = _field(batch, "image_id", self)
        _check_batch(predictions=predictions, answers=labels, question_kinds=subtasks, image_id=images)
        indices = _group_indices(subtasks, self._index)
        parsed = [mme_answer(prediction) for prediction in predictions]
        self.unparsable += sum(answer is None for answer in parsed)
        like = self.unparsable
        self.question_subtask.append(_long(indices, like))
        self.question_image.append(_long([_stable_id(f"{s}/{i}") for s, i in zip(subtasks, images, strict=True)], like))
        self.question_hit.append(_long([int(a == label) for a, label in zip(parsed, labels, strict=True)], like))

    def compute(self) -> dict[str, torch.Tensor]:
        subtask, image, hit = _cat(self.question_subtask), _cat(self.question_image), _cat(self.question_hit)
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
