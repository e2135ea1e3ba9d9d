"""POPE's scores, hand-computed as LLaVA-1.5's eval_pope.py computes them."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    OVERALL,
    POPEMetrics,
    pope_answer,
)
from tests.metrics.conftest import values_of


# --- POPE: LLaVA-1.5's eval_pope.py ----------------------------------------------------------------
# Text before the first ".", commas deleted, split on single spaces: "No" / "no" / "not" a word -> no.
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("No.", "no"), (" no \n", "no"),  # model_vqa_loader strips the generated text
        ("NO", "yes"), ("Nope", "yes"), ("I cannot tell", "yes"), ("", "yes"),  # eval_pope.py's rule, literally
        ("yes, no", "no"),  # commas dropped, then "no" is a word
        ("No\nThere is a dog", "yes"),  # split on spaces only: "No\nThere" is one word
        ("no\tdog", "yes"),
        ("Yes.\nNo", "yes"),
    ],
)  # fmt: skip
def test_pope_answer(prediction, expected):
    assert pope_answer(prediction) == expected


def test_pope_corpus_scores_by_eval_pope():
    # eval_pope.py per answer: yes, yes ("No\nThere" is one word), yes ("NO"), no, yes (empty), no
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    predictions = ["Yes", "No\nThere is a cat", "NO", "There is no dog.", "", "no."]
    metric = POPEMetrics(["random"])
    metric.update(predictions, {"answers": labels, "question_kinds": ["random"] * 6})
    scores = values_of(metric.compute())
    # TP 3 (answers 1, 2, 5), FP 1 (answer 3), TN 2, FN 0
    assert metric.counts.tolist() == [[3, 1, 2, 0]]
    assert metric.question_scores(predictions, {"answers": labels}) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # accuracy 5/6
    assert scores["random/precision"] == pytest.approx(3 / 4) and scores["random/recall"] == 1.0
    assert scores["random/f1"] == pytest.approx(6 / 7) and scores[OVERALL] == pytest.approx(6 / 7)
    assert scores["random/accuracy"] == pytest.approx(5 / 6) and scores["random/yes_ratio"] == pytest.approx(4 / 6)


def test_pope_counts_hand_computed():
    metric = POPEMetrics(["adversarial", "random"])
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    predictions = ["Yes", "No", "Yes", "No", "yes", "no"]  # TP FN FP TN | TP TN
    metric.update(predictions, {"answers": labels, "question_kinds": ["adversarial"] * 4 + ["random"] * 2})
    assert metric.counts.tolist() == [[1, 1, 1, 1], [1, 0, 1, 0]]  # tp, fp, tn, fn
    scores = values_of(metric.compute())
    assert scores["adversarial/accuracy"] == 0.5 and scores["adversarial/precision"] == 0.5
    assert scores["adversarial/recall"] == 0.5 and scores["adversarial/f1"] == 0.5 and scores["adversarial/yes_ratio"] == 0.5
    assert scores["random/f1"] == 1.0 and scores["random/yes_ratio"] == 0.5
    # pooled: TP 2, FP 1, TN 2, FN 1
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert scores[OVERALL] == pytest.approx((0.5 + 1.0) / 2)  # mean F1 over the splits
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metric.update(["yes"], {"answers": ["maybe"], "question_kinds": ["random"]})
