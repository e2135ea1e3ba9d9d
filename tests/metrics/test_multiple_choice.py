"""ScienceQA letter parsing and MMBench option matching (circular evaluation included), each expected value
derived by hand from the official script named above its test."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    OVERALL,
    MultipleChoiceAccuracy,
    mmbench_choice,
    scienceqa_letter,
)
from tests.metrics.conftest import values_of


# --- ScienceQA: LLaVA-1.5's eval_science_qa.py letter parsing ----------------------------------------
# The stripped answer is one of A-E; or it starts with a letter of A-E and ". "; or it holds exactly one
# match of "The answer is ([A-Z])." (the "." is any character); else FAILED. A letter past the options
# (or not in A-E) counts as wrong.
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"), (" C\n", "C"), ("B. cat", "B"), ("The answer is B.", "B"), ("The answer is B,", "B"),
        ("I think so. The answer is C. Done", "C"),
        ("b", None),  # lower case: not an option
        ("(B)", None), ("B.", None), ("B)", None), ("B: cat", None),  # none of the three forms
        ("The answer is B", None),  # nothing after the letter: the pattern's "." needs a character
        ("the answer is B.", None),  # lower-case "the"
        ("The answer is (B).", None),
        ("The answer is B. The answer is C.", None),  # two matches
        ("A cat", None), ("cat", None), ("", None),
        ("E", None),  # past the 4 options
        ("F", None),  # not in A-E at all
    ],
)  # fmt: skip
def test_scienceqa_letter_official_rule(prediction, expected):
    assert scienceqa_letter(prediction, num_choices=4) == expected


def test_scienceqa_metric_counts_unparsable():
    metric = MultipleChoiceAccuracy(["nat", "soc"], rule="scienceqa")
    batch = {"answers": ["B", "A", "C", "A", "B"], "num_choices": [2, 2, 3, 2, 3], "question_kinds": ["nat", "nat", "soc", "soc", "soc"]}
    # B right; "(A)" unparsable; "The answer is C." right; "C" past 2 options: unparsable; "A. cat" parsed, wrong
    metric.update(["B", "(A)", "The answer is C.", "C", "A. cat"], batch)
    assert values_of(metric.compute()) == pytest.approx({OVERALL: 2 / 5, "nat": 1 / 2, "soc": 1 / 3, "unparsable": 2})
    with pytest.raises(ValueError, match="unknown multiple-choice rule"):
        MultipleChoiceAccuracy(rule="lenient")


# --- MMBench: can_infer of open-compass/VLMEvalKit (no LLM judge) ------------------------------------
# can_infer_option: ".()[],:;!*#{}" become spaces, split into words; exactly one option letter among the
# words -> that letter; no letter but a "Z" word, or a refusal phrase -> no option. Else can_infer_text:
# exactly one option text (lower-cased) inside the lower-cased answer -> that option.
MMBENCH_OPTIONS = ["dog", "cat", "bird"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) cat", "B"), ("The answer is B.", "B"), ("**B**", "B"),
        ("cat\nB", "B"),  # split on any whitespace
        ("The bird, option C", "C"),
        ("A cat", "A"),  # MMBench reads the capital "A" as option A
        ("cat", "B"), ("It is a cat.", "B"), ("Birds", "C"), ("CAT", "B"),  # by option text
        ("b", None),  # a lower-case letter is no option letter, and no option text is in "b"
        ("B or C", None),  # two letters, no option text
        ("a cat or a dog", None),  # two option texts
        ("D", None),  # not an option: no letter, no text
        ("Z", None), ("", None), ("I don't know", None),
        ("Cannot determine the answer", None),  # a refusal
    ],
)  # fmt: skip
def test_mmbench_choice_official_rule(prediction, expected):
    assert mmbench_choice(prediction, MMBENCH_OPTIONS) == expected


def test_mmbench_circular_across_batches_and_ranks():
    options = [["dog", "cat", "bird"], ["cat", "bird", "dog"], ["bird", "dog", "cat"], ["red", "blue"], ["blue", "red"]]
    batch = {
        "answers": ["B", "A", "C", "B", "A"],
        "options": options,
        "question_group": ["q1", "q1", "q1", "q2", "q2"],
        "circular_shift": [0, 1, 2, 1, 0],
        "question_kinds": ["x", "x", "x", "y", "y"],
    }
    # q1: "cat" (text -> B), "A." (A), "(C) cat" (C): right in every shift; q2: "blue" (B) right, "I don't know"
    # (no option) wrong
    predictions = ["cat", "A.", "(C) cat", "blue", "I don't know"]
    single = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    single.update(predictions, batch)
    # vanilla: the shift-0 records only (q1's "cat" right, q2's "I don't know" wrong), not 4 of 5 records
    expected = {OVERALL: 0.5, "vanilla": 1 / 2, "x": 1.0, "y": 0.0, "unparsable": 1}
    assert values_of(single.compute()) == pytest.approx(expected)
    # the shifts of q1 split over two ranks: merged, still one question
    rank0 = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    rank1 = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    rank0.update(predictions[:2], {k: v[:2] for k, v in batch.items()})
    rank1.update(predictions[2:], {k: v[2:] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert values_of(rank0.compute()) == pytest.approx(expected)
    with pytest.raises(KeyError, match="question_group"):
        MultipleChoiceAccuracy(rule="mmbench", circular=True).update(["A"], {"answers": ["A"], "options": [["x", "y"]]})
    with pytest.raises(KeyError, match="circular_shift"):
        batch = {"answers": ["A"], "options": [["x", "y"]], "question_group": ["q"]}
        MultipleChoiceAccuracy(rule="mmbench", circular=True).update(["A"], batch)
    with pytest.raises(KeyError, match="options"):
        MultipleChoiceAccuracy(rule="mmbench").update(["A"], {"answers": ["A"]})
