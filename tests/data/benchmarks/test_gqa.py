"""GQA loader on its stand-in."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import SHORT_ANSWER, GQADataModule
from adaptive_mllm.metrics import GQAAccuracy


def test_reads_testdev_balanced(gqa_files, first_batch, prompts_of):
    dm = GQADataModule(str(gqa_files["questions"]), batch_size=3)
    batch = first_batch(dm)
    assert batch["ids"] == ["201307251", "201640614", "20968379"]
    assert batch["answers"] == ["no", "triangle", "green"]
    assert batch["question_kinds"] == ["verify", "query", "query"]
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert prompts_of(dm)[1] == f"<image>\nWhat shape is on the left?\n{SHORT_ANSWER}"


def test_metric(gqa_files, first_batch):
    dm = GQADataModule(str(gqa_files["questions"]), batch_size=3)
    batch = first_batch(dm)
    metric = dm.make_metric("test")
    assert isinstance(metric, GQAAccuracy) and metric.groups == ["query", "verify"]
    # convert_gqa_for_eval.py + eval.py: "No." -> "no" right; "A triangle" keeps its article: wrong
    metric.update(["No.", "A triangle", "Green"], batch)
    assert {k: v.item() for k, v in metric.compute().items()} == pytest.approx({"overall": 2 / 3, "verify": 1.0, "query": 0.5})


def test_record_without_image_id(gqa_files):
    path = gqa_files["questions"]
    content = json.loads(path.read_text())
    del content["201640614"]["imageId"]
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"record id '201640614' \(index 1\), field 'imageId': missing"):
        GQADataModule(str(path)).setup("test")


def test_list_instead_of_mapping(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(DataError, match="expected GQA's questions file"):
        GQADataModule(str(path)).setup("test")


def test_an_empty_answer_is_refused_for_scoring(gqa_files, first_batch):
    path = gqa_files["questions"]
    content = json.loads(path.read_text())
    content["201640614"]["answer"] = " "
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"record id '201640614' \(index 1\), field 'answer': expected a non-empty answer"):
        GQADataModule(str(path)).setup("test")
    first_batch(GQADataModule(str(path), batch_size=3), "predict")  # predict scores nothing
