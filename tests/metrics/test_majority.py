"""The majority-answer baseline against hand-computed scores and against GroupedExactMatch."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    OVERALL,
    GroupedExactMatch,
    majority_answers,
    majority_baseline_accuracy,
)
from tests.metrics.conftest import GROUPS, KINDS, REFERENCES, scores_of


def test_majority_answers():
    answers = ["Yes", "yes.", "no", "red", "Blue", "blue", "2", "two", "3", "three"]
    groups = ["yesno", "yesno", "yesno", "color", "color", "color", "count", "count", "count", "count"]
    # yesno: yes 2 / no 1; color: blue 2 / red 1; count: 2 and 3 tie at 2 each -> "2" (alphabetical)
    assert majority_answers(answers, groups) == {"color": "blue", "count": "2", "yesno": "yes"}


def test_majority_baseline_accuracy_hand_computed():
    majority = {"yesno": "yes", "color": "Red.", "count": "two"}
    references = ["yes", "no", "Yes.", "red", "blue", "2", "3", "circle"]
    groups = ["yesno", "yesno", "yesno", "color", "color", "count", "count", "shape"]
    # yesno 2/3, color 1/2 (majority normalised), count 1/2 ("two" == "2"), shape 0/1 (no majority answer)
    assert majority_baseline_accuracy(majority, references, groups) == pytest.approx(
        {OVERALL: 4 / 8, "yesno": 2 / 3, "color": 1 / 2, "count": 1 / 2, "shape": 0.0}
    )


def test_majority_baseline_agrees_with_grouped_exact_match():
    majority = {"color": "red", "count": "2", "yesno": "no"}
    metric = GroupedExactMatch(KINDS)
    metric.update([majority[g] for g in GROUPS], REFERENCES, GROUPS)
    assert majority_baseline_accuracy(majority, REFERENCES, GROUPS) == pytest.approx(scores_of(metric))


def test_majority_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        majority_baseline_accuracy({"a": "x"}, ["x", "y"], ["a"])
    with pytest.raises(ValueError, match="reserved"):
        majority_baseline_accuracy({OVERALL: "x"}, ["x"], [OVERALL])
