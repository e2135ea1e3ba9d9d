"""Metrics against hand-computed answers: VQA normalisation, (grouped) exact match, DDP merging,
majority baseline."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mllm.metrics import (
    DEFAULT_GROUP,
    OVERALL,
    ExactMatch,
    GroupedExactMatch,
    majority_answers,
    majority_baseline_accuracy,
    normalize_answer,
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


# --- ExactMatch -----------------------------------------------------------------------------------
def test_exact_match_hand_computed():
    metric = ExactMatch()
    metric.update(["Yes.", "two", "the cat", "red"], ["yes", "2", "cat", "blue"])
    assert metric.compute().item() == pytest.approx(3 / 4)
    metric.update(["no"], ["No"])
    assert metric.compute().item() == pytest.approx(4 / 5)
    assert metric.correct.item() == 4 and metric.total.item() == 5


def test_exact_match_reset():
    metric = ExactMatch()
    metric.update(["yes", "yes"], ["yes", "yes"])
    assert metric.compute().item() == 1.0
    metric.reset()
    assert metric.correct.item() == 0 and metric.total.item() == 0
    metric.update(["yes", "no"], ["no", "no"])
    assert metric.compute().item() == pytest.approx(1 / 2)  # the two earlier hits are gone


def test_exact_match_empty_is_zero():
    metric = ExactMatch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns of compute before update
        assert metric.compute().item() == 0.0


def test_exact_match_rejects_bad_batches():
    metric = ExactMatch()
    with pytest.raises(TypeError, match="one string"):
        metric.update("yes", "yes")
    with pytest.raises(ValueError, match="lengths differ"):
        metric.update(["yes", "no"], ["yes"])
    assert metric.total.item() == 0


def test_exact_match_merge_of_two_ranks_equals_one_pass():
    predictions = ["Yes.", "two", "the cat", "red", "3", "blue"]
    references = ["yes", "2", "cat", "blue", "three", "green"]
    single = ExactMatch()
    single.update(predictions, references)
    rank0, rank1 = ExactMatch(), ExactMatch()
    rank0.update(predictions[:2], references[:2])
    rank1.update(predictions[2:], references[2:])
    assert rank0.compute().item() == 1.0 and rank1.compute().item() == pytest.approx(2 / 4)  # differ from the whole
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(4 / 6)
    assert rank0.compute().item() == single.compute().item()


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


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = GroupedExactMatch(KINDS)
        shard = slice(rank, None, world_size)  # ranks see different, uneven mixes of groups
        metric.update(PREDICTIONS[shard], REFERENCES[shard], GROUPS[shard])
        result = {"scores": {k: v.item() for k, v in metric.compute().items()}, "counts": metric.counts()}
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
