"""GroupedExactMatch against hand-computed scores: groups, batches, bad input, and DDP merging (list states of
MME and circular MMBench too) in real processes."""

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
)
from tests.metrics.conftest import GROUPS, KINDS, PREDICTIONS, REFERENCES, scores_of


def test_grouped_exact_match_hand_computed():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    assert scores_of(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})
    assert "shape" not in metric.compute()  # no example: no accuracy
    assert metric.counts() == {OVERALL: 6, "color": 2, "count": 3, "yesno": 1, "shape": 0}


def test_grouped_exact_match_accumulates_over_batches():
    metric = GroupedExactMatch(KINDS)
    for start in range(0, len(PREDICTIONS), 2):
        metric.update(PREDICTIONS[start : start + 2], REFERENCES[start : start + 2], GROUPS[start : start + 2])
    assert scores_of(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})


def test_grouped_exact_match_reset():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    metric.reset()
    assert metric.total.tolist() == [0, 0, 0, 0]
    metric.update(["circle"], ["square"], ["shape"])
    assert scores_of(metric) == {OVERALL: 0.0, "shape": 0.0}


def test_grouped_exact_match_default_group():
    metric = GroupedExactMatch()
    assert metric.groups == [DEFAULT_GROUP]
    metric.update(["yes", "no", "two"], ["yes", "yes", "2"], [DEFAULT_GROUP] * 3)
    assert scores_of(metric) == pytest.approx({OVERALL: 2 / 3, DEFAULT_GROUP: 2 / 3})


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
    assert scores_of(rank0) != scores_of(single)

    # by hand, as DDP's sum reduction does it
    summed = {name: getattr(rank0, name) + getattr(rank1, name) for name in ("correct", "total")}
    assert torch.equal(summed["correct"], single.correct) and torch.equal(summed["total"], single.total)

    rank0.merge_state(rank1)
    assert scores_of(rank0) == scores_of(single)
    assert rank0.counts() == single.counts()


def _list_state_results(rank: int) -> dict[str, float]:
    """MMEScore and circular MultipleChoiceAccuracy on one of two ranks, with uneven list states: rank 0
    sees three MME questions, rank 1 one, and image b's pair (and question q's shifts) span both ranks."""
    mme = MMEScore(["existence"])
    part = slice(0, 3) if rank == 0 else slice(3, 4)
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence"] * 4, "image_id": ["a", "a", "b", "b"]}
    mme.update(["Yes", "No", "Yes", "Yes"][part], {k: v[part] for k, v in batch.items()})  # the last one wrong
    circular = MultipleChoiceAccuracy(rule="mmbench", circular=True)
    if rank == 0:
        circular.update(["A"], {"answers": ["A"], "question_group": ["q"], "circular_shift": [0], "options": [["x", "y", "z"]]})
    else:
        shifts = {"circular_shift": [1, 1]}  # r's shift 0 is not asked: vanilla counts q's on rank 0 only
        batch = {"answers": ["B", "B"], "question_group": ["q", "r"], "options": [["y", "z", "x"], ["x", "y"]], **shifts}
        circular.update(["C", "B"], batch)
    scores = circular.compute()
    return {"mme": mme.compute()["existence"].item(), "circular": scores[OVERALL].item(), "vanilla": scores["vanilla"].item()}


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
        assert result["vanilla"] == pytest.approx(1.0)  # the one shift-0 record (rank 0's) right


def test_exact_match_metrics_take_a_batch():
    batch = {"answers": ["red", "2", "cat"], "question_kinds": ["color", "count", "color"]}
    grouped = GroupedExactMatch(["color", "count"])
    grouped.update(["Red.", "two", "dog"], batch)
    assert scores_of(grouped) == pytest.approx({OVERALL: 2 / 3, "color": 1 / 2, "count": 1.0})
    assert grouped.question_scores(["Red.", "two", "dog"], batch) == [1.0, 1.0, 0.0]  # the answers file's scores
