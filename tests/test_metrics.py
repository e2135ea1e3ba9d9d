"""Metrics against hand-computed answers: VQA normalisation, (grouped) exact match, DDP merging,
majority baseline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mllm.metrics import (
    DEFAULT_GROUP,
    OVERALL,
    GroupedExactMatch,
    MMEScore,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAAccuracy,
    majority_answers,
    majority_baseline_accuracy,
    mme_answer,
    normalize_answer,
    parse_option_letter,
    pope_answer,
    vqa_accuracy,
)


# --- normalisation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),  # case and trailing period
        ("YES", "yes"),
        ("Yes!", "yes"),  # a glued mark becomes a space, then whitespace collapses
        ("two", "2"),  # number words
        ("Ten apples", "10 apples"),
        ("none", "0"),
        ("Two.", "2"),
        ("the dog", "dog"),  # articles
        ("a red ball", "red ball"),
        ("An apple", "apple"),
        ("theory", "theory"),  # only whole words are articles
        ("  red   and  blue  ", "red and blue"),  # extra spaces
        ("red\tand\nblue", "red and blue"),
        ("2.5", "2.5"),  # a decimal point stays
        ("3.", "3"),  # a period not followed by a digit goes
        ("3.14 m.", "3.14 m"),
        (".5", ".5"),  # vqaEval.py's regex keeps a period before a digit even with no digit before it
        ("black-and-white", "black and white"),  # a mark inside a word splits it
        ("black - white", "black white"),  # a mark beside a space is deleted
        ("red, blue", "red blue"),
        ("red,blue", "red blue"),
        ("1,000", "1000"),  # a digit grouping: every mark deleted, none made a space
        ("(left)", "left"),
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("don't", "don't"),  # apostrophes are not punctuation to the script
        ("Im", "im"),  # the script's capitalised key never matches the lower-cased word
        # each mark is judged against the answer as it came in: "-" touches no space in "p-q r-(s", so
        # it becomes a space (checked against the text after "(" became a space, it would be deleted: "pq")
        ("p-q r-(s", "p q r s"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_makes_equivalent_answers_equal():
    assert normalize_answer("Yes.") == normalize_answer("yes")
    assert normalize_answer("2") == normalize_answer("two")
    assert normalize_answer("The cat.") == normalize_answer("cat")
    assert normalize_answer("yes") != normalize_answer("no")
    assert normalize_answer("2") != normalize_answer("3")


# --- GroupedExactMatch ----------------------------------------------------------------------------
# color: 1 of 2, count: 2 of 3, yesno: 1 of 1, shape: no example; overall 4 of 6
PREDICTIONS = ["Red", "blue", "two", "3", "4", "No."]
REFERENCES = ["red", "green", "2", "three", "5", "no"]
GROUPS = ["color", "color", "count", "count", "count", "yesno"]
KINDS = ["color", "count", "yesno", "shape"]


def _scores(metric: GroupedExactMatch) -> dict[str, float]:
    return {group: value.item() for group, value in metric.compute().items()}


def test_grouped_exact_match_hand_computed():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    assert _scores(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})
    assert "shape" not in metric.compute()  # no example: no accuracy
    assert metric.counts() == {OVERALL: 6, "color": 2, "count": 3, "yesno": 1, "shape": 0}


def test_grouped_exact_match_accumulates_over_batches():
    metric = GroupedExactMatch(KINDS)
    for start in range(0, len(PREDICTIONS), 2):
        metric.update(PREDICTIONS[start : start + 2], REFERENCES[start : start + 2], GROUPS[start : start + 2])
    assert _scores(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})


def test_grouped_exact_match_reset():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    metric.reset()
    assert metric.total.tolist() == [0, 0, 0, 0]
    metric.update(["circle"], ["square"], ["shape"])
    assert _scores(metric) == {OVERALL: 0.0, "shape": 0.0}


def test_grouped_exact_match_default_group():
    metric = GroupedExactMatch()
    assert metric.groups == [DEFAULT_GROUP]
    metric.update(["yes", "no", "two"], ["yes", "yes", "2"], [DEFAULT_GROUP] * 3)
    assert _scores(metric) == pytest.approx({OVERALL: 2 / 3, DEFAULT_GROUP: 2 / 3})


def test_grouped_exact_match_unknown_group_is_an_error():
    metric = GroupedExactMatch(["color"])
    with pytest.raises(KeyError, match="size"):
        metric.update(["red", "big"], ["red", "big"], ["color", "size"])
    assert metric.total.tolist() == [0]  # nothing of the refused batch was counted


@pytest.mark.parametrize(
    ("groups", "error"),
    [([], ValueError), (["a", "a"], ValueError), ([OVERALL], ValueError), ("color", TypeError)],
)
def test_grouped_exact_match_rejects_bad_groups(groups, error):
    with pytest.raises(error):
        GroupedExactMatch(groups)


def test_grouped_exact_match_rejects_bad_batches():
    metric = GroupedExactMatch(KINDS)
    with pytest.raises(TypeError, match="one string"):  # not scored character by character
        metric.update("red", ["red", "e", "d"], ["color"] * 3)
    with pytest.raises(ValueError, match="lengths differ"):
        metric.update(["red"], ["red"], ["color", "color"])
    with pytest.raises(TypeError, match="groups"):
        metric.update(["red"], ["red"], "color")


def test_grouped_exact_match_merge_of_two_ranks_equals_one_pass():
    single = GroupedExactMatch(KINDS)
    single.update(PREDICTIONS, REFERENCES, GROUPS)
    rank0, rank1 = GroupedExactMatch(KINDS), GroupedExactMatch(KINDS)
    rank0.update(PREDICTIONS[:3], REFERENCES[:3], GROUPS[:3])
    rank1.update(PREDICTIONS[3:], REFERENCES[3:], GROUPS[3:])
    assert _scores(rank0) != _scores(single)

    # by hand, as DDP's sum reduction does it
    summed = {name: getattr(rank0, name) + getattr(rank1, name) for name in ("correct", "total")}
    assert torch.equal(summed["correct"], single.correct) and torch.equal(summed["total"], single.total)

    rank0.merge_state(rank1)
    assert _scores(rank0) == _scores(single)
    assert rank0.counts() == single.counts()


def _list_state_results(rank: int) -> dict[str, float]:
    """MMEScore and circular MultipleChoiceAccuracy on one of two ranks, with uneven list states: rank 0
    sees three MME questions, rank 1 one, and image b's pair (and question q's shifts) span both ranks."""
    mme = MMEScore(["existence"])
    part = slice(0, 3) if rank == 0 else slice(3, 4)
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence"] * 4, "image_id": ["a", "a", "b", "b"]}
    mme.update(["Yes", "No", "Yes", "Yes"][part], {k: v[part] for k, v in batch.items()})  # the last one wrong
    circular = MultipleChoiceAccuracy(circular=True)
    if rank == 0:
        circular.update(["A"], {"answers": ["A"], "question_group": ["q"]})
    else:
        circular.update(["C", "B"], {"answers": ["B", "B"], "question_group": ["q", "r"]})
    return {"mme": mme.compute()["existence"].item(), "circular": circular.compute()[OVERALL].item()}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = GroupedExactMatch(KINDS)
        shard = slice(rank, None, world_size)  # ranks see different, uneven mixes of groups
        metric.update(PREDICTIONS[shard], REFERENCES[shard], GROUPS[shard])
        result = {"scores": {k: v.item() for k, v in metric.compute().items()}, "counts": metric.counts()}
        result.update(_list_state_results(rank))
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_grouped_exact_match_syncs_across_real_processes(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    expected = {OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0}
    for rank in range(world_size):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["scores"] == pytest.approx(expected)
        assert result["counts"] == {OVERALL: 6, "color": 2, "count": 3, "yesno": 1, "shape": 0}
        # list states (cat): the pairs / circular shifts split over the ranks are regrouped after the gather
        # image a both right, b one right: acc 3/4, acc+ 1/2 (rank 0 alone would give 200, rank 1 alone 0)
        assert result["mme"] == pytest.approx(125.0)
        assert result["circular"] == pytest.approx(0.5)  # q wrong in its shift on rank 1, r right


# --- majority baseline ----------------------------------------------------------------------------
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
    assert majority_baseline_accuracy(majority, REFERENCES, GROUPS) == pytest.approx(_scores(metric))


def test_majority_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        majority_baseline_accuracy({"a": "x"}, ["x", "y"], ["a"])
    with pytest.raises(ValueError, match="reserved"):
        majority_baseline_accuracy({OVERALL: "x"}, ["x"], [OVERALL])


# --- benchmark metrics: update(predictions, batch) ------------------------------------------------
def _values(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}


def test_exact_match_metrics_take_a_batch():
    batch = {"answers": ["red", "2", "cat"], "question_kinds": ["color", "count", "color"]}
    grouped = GroupedExactMatch(["color", "count"])
    grouped.update(["Red.", "two", "dog"], batch)
    assert _scores(grouped) == pytest.approx({OVERALL: 2 / 3, "color": 1 / 2, "count": 1.0})


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("red", ["red"] * 10, 1.0),
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # 3 subsets hold 2 of the 3 (2/3), 7 hold all 3
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # every subset holds at least 3
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("red", ["red"] + ["blue"] * 9, 0.3),  # (0 + 9 * 1/3) / 10
        ("red", ["blue"] * 10, 0.0),
        ("Two.", ["2"] * 3 + ["3"] * 7, 0.9),  # number words and punctuation are normalised
        ("a dog", ["dog"] * 10, 1.0),  # articles
        ("The Dog!", ["dog"] * 10, 1.0),
        ("black-and-white", ["black and white"] * 10, 1.0),
        ("dont know", ["don't know"] * 10, 1.0),  # contractions restored
        ("2", ["two"] * 10, 1.0),
        ("2", ["to"] * 10, 0.0),
    ],
)
def test_vqa_accuracy_hand_computed(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_metric_groups_and_batches():
    metric = VQAAccuracy(["yes/no", "number", "other"])
    batch = {
        "all_answers": [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7],
        "question_kinds": ["yes/no", "number", "other"],
    }
    metric.update(["Yes", "two", "red"], batch)
    metric.update(["no"], {"all_answers": [["yes"] * 10], "question_kinds": ["yes/no"]})
    assert _values(metric.compute()) == pytest.approx({OVERALL: (1 + 0.6 + 0.9 + 0) / 4, "yes/no": 0.5, "number": 0.6, "other": 0.9})
    assert metric.score.dtype == torch.long  # integer states: untouched by a module's precision cast


def test_vqa_accuracy_needs_the_human_answers():
    metric = VQAAccuracy()
    with pytest.raises(KeyError, match="all_answers"):
        metric.update(["red"], {"answers": ["red"]})
    with pytest.raises(ValueError, match="non-empty"):
        metric.update(["red"], {"all_answers": [[]]})
    with pytest.raises(KeyError, match="unknown groups"):
        metric.update(["red"], {"all_answers": [["red"]], "question_kinds": ["other"]})


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), (" C ", "C"),
        ("(B) cat", "B"), ("B. cat", "B"), ("B: cat", "B"), ("The answer is B", "B"), ("The answer is B.", "B"),
        ("Answer: (C) triangle", "C"), ("the correct option is D", "D"),
        ("A cat", None),  # an article, not option A
        ("the answer is A cat", None), ("cat", None), ("", None), ("E", None), ("I think so", None),
    ],
)  # fmt: skip
def test_parse_option_letter(prediction, expected):
    assert parse_option_letter(prediction, num_choices=4) == expected


def test_parse_option_letter_past_the_options():
    assert parse_option_letter("the correct option is D", num_choices=3) is None
    assert parse_option_letter("C", num_choices=3) == "C" and parse_option_letter("D.", num_choices=3) is None


def test_multiple_choice_counts_unparsable():
    metric = MultipleChoiceAccuracy(["nat", "soc"])
    batch = {"answers": ["B", "A", "C", "A"], "num_choices": [2, 2, 3, 2], "question_kinds": ["nat", "nat", "soc", "soc"]}
    metric.update(["(B) cat", "B", "I do not know", "C"], batch)  # C is past 2 options
    assert _values(metric.compute()) == pytest.approx({OVERALL: 1 / 4, "nat": 1 / 2, "soc": 0.0, "unparsable": 2})


def test_multiple_choice_circular_across_batches_and_ranks():
    batch = {
        "answers": ["A", "B", "C", "B", "A"],
        "question_group": ["q1", "q1", "q1", "q2", "q2"],
        "question_kinds": ["x", "x", "x", "y", "y"],
    }
    predictions = ["A", "B", "C", "B", "B"]  # q1 right in every shift, q2 wrong in one
    single = MultipleChoiceAccuracy(["x", "y"], circular=True)
    single.update(predictions, batch)
    expected = {OVERALL: 0.5, "vanilla": 4 / 5, "x": 1.0, "y": 0.0, "unparsable": 0}
    assert _values(single.compute()) == pytest.approx(expected)
    # the shifts of q1 split over two ranks: merged, still one question
    rank0, rank1 = MultipleChoiceAccuracy(["x", "y"], circular=True), MultipleChoiceAccuracy(["x", "y"], circular=True)
    rank0.update(predictions[:2], {k: v[:2] for k, v in batch.items()})
    rank1.update(predictions[2:], {k: v[2:] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert _values(rank0.compute()) == pytest.approx(expected)
    with pytest.raises(KeyError, match="question_group"):
        MultipleChoiceAccuracy(circular=True).update(["A"], {"answers": ["A"]})


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("No.", "no"), ("NO", "yes"), ("Nope", "yes"), ("I cannot tell", "yes"),  # eval_pope.py's rule, literally
        ("yes, no", "no"),  # commas dropped, then "no" is a word
    ],
)  # fmt: skip
def test_pope_answer(prediction, expected):
    assert pope_answer(prediction) == expected


def test_pope_counts_hand_computed():
    metric = POPEMetrics(["adversarial", "random"])
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    predictions = ["Yes", "No", "Yes", "No", "yes", "no"]  # TP FN FP TN | TP TN
    metric.update(predictions, {"answers": labels, "question_kinds": ["adversarial"] * 4 + ["random"] * 2})
    assert metric.counts.tolist() == [[1, 1, 1, 1], [1, 0, 1, 0]]  # tp, fp, tn, fn
    scores = _values(metric.compute())
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


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("Not sure", "no"), ("It is yes", None), ("maybe", None)],
)
def test_mme_answer(prediction, expected):
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
    scores = _values(whole.compute())
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert scores[OVERALL] == pytest.approx(325.0) and scores["existence/acc_plus"] == 0.5
    # each image's two questions in different batches, on different ranks
    rank0, rank1 = MMEScore(), MMEScore()
    for metric, part in ((rank0, slice(0, None, 2)), (rank1, slice(1, None, 2))):
        metric.update(predictions[part], {k: v[part] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert _values(rank0.compute()) == pytest.approx(scores)
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        MMEScore(["colour"])


def test_mme_same_image_name_in_two_subtasks_is_two_images():
    metric = MMEScore(["existence", "count"])
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence", "existence", "count", "count"], "image_id": ["x"] * 4}
    metric.update(["Yes", "No", "No", "No"], batch)
    scores = _values(metric.compute())
    assert scores["existence"] == 200.0 and scores["count"] == pytest.approx(50.0)
