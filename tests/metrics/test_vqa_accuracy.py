"""VQAv2 and TextVQA accuracy: a corpus of tricky predictions, each expected value derived by hand from the
official script named above its test."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.metrics import (
    OVERALL,
    VQAAccuracy,
    evalai_answer,
    vqa_accuracy,
)
from tests.metrics.conftest import values_of


# --- VQAv2: LLaVA-1.5's convert_vqav2_for_submission.py (EvalAI answer processor), then vqaEval.py ---------
# Each expected value by hand: the prediction, stripped, goes through the EvalAI processor (lower-case;
# "," and "?" deleted; "'s" -> " 's"; punctuation, number words, articles, contractions); vqaEval then
# normalises both sides only when the ten humans disagree, and averages min(#matching / 3, 1) over the
# ten leave-one-out subsets of nine humans.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("red", ["red"] * 10, 1.0),
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # 3 subsets hold 2 of the 3 (2/3), 7 hold all 3
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # every subset holds at least 3
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("red", ["red"] + ["blue"] * 9, 0.3),  # (0 + 9 * 1/3) / 10
        ("red", ["blue"] * 10, 0.0),
        ("Yes.", ["yes"] * 10, 1.0),  # EvalAI: lower-cased, the period stripped
        ("YES", ["yes"] * 10, 1.0),
        ("yes!", ["yes"] * 10, 1.0),  # "!" touches no space: a space, then dropped by the word split
        ("Two.", ["2"] * 3 + ["3"] * 7, 0.9),  # EvalAI: "two" -> "2"; humans disagree: normalised too
        ("Two", ["2"] * 10, 1.0),  # EvalAI maps the number word itself
        ("a dog", ["dog"] * 10, 1.0),  # EvalAI drops articles
        ("The Dog!", ["dog"] * 10, 1.0),
        ("black-and-white", ["black and white"] * 10, 1.0),  # "-" inside a word becomes a space
        ("dont know", ["don't know"] * 10, 1.0),  # contraction restored by EvalAI
        ("1,000", ["1000"] * 10, 1.0),  # EvalAI deletes commas
        ("red\nblue", ["red blue"] * 10, 1.0),  # newline to space
        ("  red  ", ["red"] * 10, 1.0),  # model_vqa_loader strips the generated text
        ("", ["yes"] * 10, 0.0),  # an empty answer matches no human
        ("The answer is yes", ["yes"] * 10, 0.0),  # "the" dropped, "answer is yes" != "yes"
        # ten humans agree: vqaEval compares their answer as written, so a capitalised one never matches
        # the lower-cased submission, and "2" never matches "two"
        ("Dog", ["Dog"] * 10, 0.0),
        ("2", ["two"] * 10, 0.0),
        ("2", ["two"] * 9 + ["2"], 1.0),  # disagree: "two" -> "2" for all ten, so every subset holds 9
        # EvalAI splits "'s" off ("man 's"); vqaEval's own normalisation keeps "man's": never equal
        ("man's", ["man's"] * 10, 0.0),
        ("man's", ["man's"] * 9 + ["man"], 0.0),
    ],
)
def test_vqav2_accuracy_official_rule(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers, rule="vqav2") == pytest.approx(expected)


def test_evalai_answer_processor():
    # m4c_evaluator.py's EvalAIAnswerProcessor, by hand
    assert evalai_answer("Man's hat?") == "man 's hat"
    assert evalai_answer("Hello, World") == "hello world"
    assert evalai_answer("hello,world") == "helloworld"  # the comma deleted, not made a space
    assert evalai_answer("Coca-Cola") == "coca cola"
    assert evalai_answer("The two dogs.") == "2 dogs"
    assert evalai_answer("3.5 m.") == "3.5 m"
    assert evalai_answer("") == ""


# --- TextVQA: m4c_evaluator.py's TextVQAAccuracyEvaluator (LLaVA's eval_textvqa.py) ---------------------
# EvalAI processor on the prediction and on all ten human answers, always; then the leave-one-out mean.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Dakota", ["dakota"] * 10, 1.0),
        ("DAKOTA.", ["dakota"] * 10, 1.0),
        ("the nokia", ["nokia"] * 10, 1.0),  # article dropped
        ("nokia\n", ["nokia"] * 10, 1.0),
        ("", ["nokia"] * 10, 0.0),
        ("coca-cola", ["coca cola"] * 10, 1.0),
        ("man's", ["man's"] * 10, 1.0),  # both sides become "man 's"
        ("Dog", ["Dog"] * 10, 1.0),  # humans are processed even when they agree (unlike VQAv2)
        ("hello,world", ["hello world"] * 10, 0.0),  # EvalAI deletes the comma: "helloworld"
        ("Hello, World", ["hello world"] * 10, 1.0),
        ("stop", ["stop"] * 2 + ["halt"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("STOP!", ["stop"] * 4 + ["halt"] * 6, 1.0),
        ("cant", ["can't"] * 10, 1.0),
    ],
)
def test_textvqa_accuracy_official_rule(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers, rule="textvqa") == pytest.approx(expected)


def test_textvqa_needs_ten_answers():
    with pytest.raises(ValueError, match="exactly 10 human answers"):
        vqa_accuracy("red", ["red"] * 9, rule="textvqa")
    with pytest.raises(ValueError, match="unknown VQA rule"):
        VQAAccuracy(rule="lenient")


def test_vqa_accuracy_metric_groups_and_batches():
    metric = VQAAccuracy(["yes/no", "number", "other"])
    batch = {
        "all_answers": [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7],
        "question_kinds": ["yes/no", "number", "other"],
    }
    metric.update(["Yes", "two", "red"], batch)
    metric.update(["no"], {"all_answers": [["yes"] * 10], "question_kinds": ["yes/no"]})
    assert values_of(metric.compute()) == pytest.approx({OVERALL: (1 + 0.6 + 0.9 + 0) / 4, "yes/no": 0.5, "number": 0.6, "other": 0.9})
    assert metric.score.dtype == torch.long  # integer states: untouched by a module's precision cast
    scores = metric.question_scores(["Yes", "two", "red"], batch)
    assert scores == pytest.approx([1.0, 0.6, 0.9])  # each answer's accuracy, as the hand values above


def test_vqa_metric_corpus_per_rule():
    # the same predictions, scored by each rule (values from the two parametrised corpora above)
    predictions = ["Dog", "man's", "hello,world", "Two"]
    answers = [["Dog"] * 10, ["man's"] * 10, ["hello world"] * 10, ["2"] * 10]
    vqav2, textvqa = VQAAccuracy(rule="vqav2"), VQAAccuracy(rule="textvqa")
    vqav2.update(predictions, {"all_answers": answers})
    textvqa.update(predictions, {"all_answers": answers})
    # vqav2: 0 ("Dog" vs agreeing "Dog"), 0 ("man 's" vs "man's"), 0 ("helloworld"), 1 -> 1/4
    assert vqav2.compute()[OVERALL].item() == pytest.approx(1 / 4)
    # textvqa: 1, 1, 0, 1 -> 3/4
    assert textvqa.compute()[OVERALL].item() == pytest.approx(3 / 4)


def test_vqa_accuracy_needs_the_human_answers():
    metric = VQAAccuracy()
    with pytest.raises(KeyError, match="all_answers"):
        metric.update(["red"], {"answers": ["red"]})
    with pytest.raises(ValueError, match="non-empty"):
        metric.update(["red"], {"all_answers": [[]]})
    with pytest.raises(KeyError, match="unknown groups"):
        metric.update(["red"], {"all_answers": [["red"]], "question_kinds": ["other"]})
