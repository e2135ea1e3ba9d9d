"""Answer metrics as torchmetrics Metrics: their states are count tensors of fixed shape that sum across
processes, so DDP just works.

The generic metrics (:class:`ExactMatch`, :class:`GroupedExactMatch`) compare answers after the
normalisation of the official VQA evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), so that "Yes." and "yes", or "two" and "2", count as
the same answer. The benchmark metrics read and compare answers exactly as each benchmark's official
pipeline does (LLaVA-1.5's conversion scripts, then the benchmark's own scorer), so that their numbers are
comparable with published tables: see docs/benchmarks.md for the script each one matches.
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
# A test report's row holds the scores by group beside these columns: a question kind named like one would overwrite it.
REPORT_COLUMNS = ("budget", "flops_fraction", "flops_vs_plain", "units", "prefill_ms", "decode_ms_per_token", "questions", "skipped_records")
RESERVED_GROUPS = (OVERALL, *REPORT_COLUMNS)
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
    # the script passes re.UNICODE (32) where re.sub takes its count: at most 32 periods are removed
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


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


def evalai_answer(text: str) -> str:
    """An answer as the EvalAI answer processor of m4c_evaluator.py (LLaVA's ``EvalAIAnswerProcessor``)
    writes it: lower-cased, commas and question marks deleted, "'s" split off as its own word ("man's"
    -> "man 's"), then the vqaEval punctuation, number-word, article and contraction rules. LLaVA-1.5
    passes VQAv2 predictions through it before submission, and TextVQA's scorer applies it to both sides.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
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
        return [float(hit) for hit in self.hits(predictions, _field(batch, "answers", self))]

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
# score under ``"overall"`` beside its parts; a metric that scores each answer alone also has
# ``question_scores(predictions, batch)`` (the ``score`` of the test's answers file). States are integer
# tensors summed over processes, or, where examples must be regrouped (MME's image pairs, MMBench's circular shifts), integer lists concatenated
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


class VQAAccuracy(_CountMetric):
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
            score[index] += round(_vqa_thirds(prediction, humans, self.rule) * VQA_SCALE)
            total[index] += 1
        self.score += _long(score, self.score)
        self.total += _long(total, self.total)

    def question_scores(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[float]:
        """Each answer's accuracy (0, 1/3, 2/3 or 1 averaged over the leave-one-out subsets), as ``update`` sums it."""
        return [vqa_accuracy(p, humans, self.rule) for p, humans in zip(predictions, _field(batch, "all_answers", self), strict=True)]

    def compute(self) -> dict[str, torch.Tensor]:
        scale = self.total.new_tensor(VQA_SCALE)
        scores = {OVERALL: _ratio(self.score.sum(), self.total.sum() * scale)}
        for group, index in self._index.items():
            if self.total[index] > 0:
                scores[group] = _ratio(self.score[index], self.total[index] * scale)
        return scores


# GQA ----------------------------------------------------------------------------------------------
def gqa_prediction(prediction: str) -> str:
    """A generated answer as LLaVA-1.5's convert_gqa_for_eval.py writes it for GQA's eval.py: the text
    (stripped by model_vqa_loader) without trailing periods, lower-cased; nothing else ("a dog" stays)."""
    return prediction.strip().rstrip(".").lower()


class GQAAccuracy(GroupedExactMatch):
    """GQA's eval.py accuracy after LLaVA-1.5's conversion: ``gqa_prediction(p) == answer``, the answer
    exactly as in the questions file (no VQA normalisation), overall and per group (structural type)."""

    def hits(self, predictions: Sequence[str], references: Sequence[str]) -> list[int]:
        return [int(gqa_prediction(p) == r) for p, r in zip(predictions, references, strict=True)]


# multiple choice ----------------------------------------------------------------------------------
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


class MultipleChoiceAccuracy(_CountMetric):
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
            self.add_state("first_shift_correct", default=torch.tensor(0), dist_reduce_fx="sum")
            self.add_state("first_shift_total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _letters(self, predictions: Sequence[str], batch: Mapping[str, Any], size: int) -> list[str | None]:
        if self.rule == "mmbench":
            options = _field(batch, "options", self)
            if len(options) != size:
                raise ValueError(f"batch lengths differ: {size} answers, {len(options)} options")
            return [mmbench_choice(p, o) for p, o in zip(predictions, options, strict=True)]
        choices = _field(batch, "num_choices", self)
        if len(choices) != size:
            raise ValueError(f"batch lengths differ: {size} answers, {len(choices)} num_choices")
        return [scienceqa_letter(p, int(n)) for p, n in zip(predictions, choices, strict=True)]

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        references = _field(batch, "answers", self)
        size = len(references)
        groups = _kinds(batch, size)
        _check_batch(predictions=predictions, answers=references, groups=groups)
        questions = _field(batch, "question_group", self) if self.circular else []
        shifts = _field(batch, "circular_shift", self) if self.circular else []
        if self.circular and (len(questions) != size or len(shifts) != size):
            raise ValueError(f"batch lengths differ: {size} answers, {len(questions)} question_group, {len(shifts)} circular_shift")
        indices = _group_indices(groups, self._index)
        letters = self._letters(predictions, batch, size)
        correct, total, unparsable = ([0] * len(self.groups) for _ in range(3))
        hits = []
        for letter, reference, index in zip(letters, references, indices, strict=True):
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
            first = [int(shift) == 0 for shift in shifts]
            self.first_shift_correct += sum(hit for hit, is_first in zip(hits, first, strict=True) if is_first)
            self.first_shift_total += sum(first)

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
            scores["vanilla"] = _ratio(self.first_shift_correct, self.first_shift_total)
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
    """"yes" or "no" as LLaVA-1.5's eval_pope.py reads a generated answer (stripped by model_vqa_loader):
    only the text before its first period counts, commas dropped; it is "no" if one of its words split
    on single spaces (not on newlines or tabs: "No\nthere" is one word) is "No", "no" or "not", else
    "yes" (so "NO", "Nope" and an empty answer count as yes)."""
    sentence = prediction.strip().split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(sentence.split(" ")) else "yes"


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

    def question_scores(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[float]:
        """1 where the answer read by :func:`pope_answer` is the label, else 0 (POPE's accuracy per answer)."""
        labels = [str(label).strip().lower() for label in _field(batch, "answers", self)]
        return [float(pope_answer(p) == label) for p, label in zip(predictions, labels, strict=True)]

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
    """"yes" / "no" as MME's calculation.py reads an answer (lower-cased: exactly "yes" or "no"; else
    "yes" if its first four characters hold "yes", else "no" if they hold "no"), None when it is neither
    (calculation.py's "other": a wrong answer)."""
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
