"""GQA accuracy: tricky predictions scored by hand as LLaVA-1.5's conversion and GQA's eval.py score them."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    DEFAULT_GROUP,
    OVERALL,
    GQAAccuracy,
    gqa_prediction,
)
from tests.metrics.conftest import values_of


def test_gqa_question_scores_follow_its_rule():
    batch = {"answers": ["dog", "a dog"], "question_kinds": ["all", "all"]}
    assert GQAAccuracy().question_scores(["Dog.", "dog"], batch) == [1.0, 0.0]  # no VQA normalisation: "a dog" stays


# --- GQA: LLaVA-1.5's convert_gqa_for_eval.py (rstrip "." and lower-case), then GQA's eval.py (==) ----
@pytest.mark.parametrize(
    ("prediction", "answer", "hit"),
    [
        ("Dog", "dog", 1),
        ("dog.", "dog", 1),
        ("Dog..", "dog", 1),  # every trailing period
        (" no\n", "no", 1),  # model_vqa_loader strips the generated text
        ("3.", "3", 1),
        ("a dog", "dog", 0),  # no article removal
        ("the dog", "dog", 0),
        ("two", "2", 0),  # no number words
        ("yes!", "yes", 0),  # no punctuation removal
        ("Yes, it is.", "yes", 0),
        ("Black-and-white", "black and white", 0),
        ("black and white", "black and white", 1),
        ("", "no", 0),
        ("no .", "no", 0),  # "no " after the period goes: the space stays
    ],
)
def test_gqa_official_rule(prediction, answer, hit):
    metric = GQAAccuracy()
    metric.update([prediction], [answer], [DEFAULT_GROUP])
    assert metric.compute()[OVERALL].item() == hit


def test_gqa_metric_corpus_per_group():
    metric = GQAAccuracy(["verify", "query"])
    batch = {"answers": ["no", "triangle", "green", "2"], "question_kinds": ["verify", "query", "query", "query"]}
    metric.update(["No.", "A triangle", "Green", "two"], batch)  # hits 1, 0, 1, 0 by the rule above
    assert values_of(metric.compute()) == pytest.approx({OVERALL: 2 / 4, "verify": 1.0, "query": 1 / 3})
    assert gqa_prediction("  Left..\n") == "left"
