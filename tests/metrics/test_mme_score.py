"""MME's answer reading and acc / acc+ scores per image pair, hand-computed."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    OVERALL,
    MMEScore,
    mme_answer,
)
from tests.metrics.conftest import values_of


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("NO.", "no"), (" yes \n", "yes"),
        ("Yes\nIt is", "yes"),  # "yes" in the first four characters
        ("Not sure", "no"), ("nope", "no"), ("no, yes", "no"),  # "no" in the first four, "yes" not
        ("Eyes", "yes"), ("Knob", "no"),  # calculation.py's substring test, literally
        ("It is yes", None), ("maybe", None), ("I don't know", None), ("Unknown", None), ("", None),
    ],
)  # fmt: skip
def test_mme_answer(prediction, expected):
    # MME's eval_tool/calculation.py: lower-cased; exactly "yes" / "no"; else "yes" in the first four
    # characters, else "no" in them; else "other" (wrong)
    assert mme_answer(prediction) == expected


def test_mme_pairs_across_batches_and_ranks():
    # existence: img a both right, img b one right -> acc 3/4, acc+ 1/2 -> 125
    # OCR: img c both right -> 200; code_reasoning: img d none right -> 0
    predictions = ["Yes", "No", "Yes", "Yes", "yes", "no", "No", "Yes"]
    batch = {
        "answers": ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"],
        "question_kinds": ["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2,
        "image_id": ["a", "a", "b", "b", "c", "c", "d", "d"],
    }
    expected = {"existence": 125.0, "OCR": 200.0, "code_reasoning": 0.0, "perception": 325.0, "cognition": 0.0, "total": 325.0}
    whole = MMEScore()
    whole.update(predictions, batch)
    scores = values_of(whole.compute())
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert scores[OVERALL] == pytest.approx(325.0) and scores["existence/acc_plus"] == 0.5
    # each image's two questions in different batches, on different ranks
    rank0, rank1 = MMEScore(), MMEScore()
    for metric, part in ((rank0, slice(0, None, 2)), (rank1, slice(1, None, 2))):
        metric.update(predictions[part], {k: v[part] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert values_of(rank0.compute()) == pytest.approx(scores)
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        MMEScore(["colour"])


def test_mme_same_image_name_in_two_subtasks_is_two_images():
    metric = MMEScore(["existence", "count"])
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence", "existence", "count", "count"], "image_id": ["x"] * 4}
    metric.update(["Yes", "No", "No", "No"], batch)
    scores = values_of(metric.compute())
    assert scores["existence"] == 200.0 and scores["count"] == pytest.approx(50.0)
