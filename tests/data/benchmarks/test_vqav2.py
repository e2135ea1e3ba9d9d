"""VQAv2 loader on its stand-in: records, batch fields, the metric, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import SHORT_ANSWER, GQADataModule, VQAv2DataModule
from adaptive_mllm.metrics import VQAAccuracy


def test_reads_the_official_layout(vqav2_files, first_batch, prompts_of):
    dm = VQAv2DataModule(str(vqav2_files["questions"]), str(vqav2_files["annotations"]), batch_size=3)
    batch = first_batch(dm)
    assert batch["ids"] == ["42000", "42001", "7000"]
    assert batch["question_id"] == [42000, 42001, 7000]
    assert batch["answers"] == ["red", "3", "yes"]  # multiple_choice_answer
    assert batch["all_answers"][1] == ["2"] * 2 + ["3"] * 8
    assert batch["question_kinds"] == ["other", "number", "yes/no"]
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert prompts_of(dm)[0] == f"<image>\nWhat colour is the circle?\n{SHORT_ANSWER}"
    assert dm.question_kinds("test") == ["number", "other", "yes/no"]


def test_metric_scores_the_batch(vqav2_files, first_batch):
    dm = VQAv2DataModule(str(vqav2_files["questions"]), str(vqav2_files["annotations"]), batch_size=3)
    batch = first_batch(dm)
    metric = dm.make_metric("test")
    assert isinstance(metric, VQAAccuracy) and metric.groups == ["number", "other", "yes/no"]
    # "dark red", given by 3 humans: the 3 subsets without one of them hold 2 (2/3), the 7 others all 3 (1):
    # (3 * 2/3 + 7) / 10 = 0.9; "two" = "2", given by 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    metric.update(["Dark red.", "two", "no"], batch)
    scores = metric.compute()
    assert scores["other"].item() == pytest.approx(0.9)
    assert scores["number"].item() == pytest.approx((2 / 3 + 16 / 3) / 10)
    assert scores["yes/no"].item() == 0.0
    assert scores["overall"].item() == pytest.approx((0.9 + 0.6) / 3)


def test_predict_needs_no_annotations(vqav2_files, first_batch):
    dm = VQAv2DataModule(str(vqav2_files["questions"]), batch_size=2)
    batch = first_batch(dm, "predict")
    assert batch["ids"] == ["42000", "42001"] and batch["answers"] == ["", ""]
    assert torch.all(batch["labels"] == -100)
    with pytest.raises(ValueError, match="annotations_json"):
        dm.setup("test")


def test_missing_file(tmp_path):
    dm = VQAv2DataModule(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="nope.json: file not found"):
        dm.setup("predict")


def test_annotations_given_as_questions(vqav2_files):
    dm = VQAv2DataModule(str(vqav2_files["annotations"]), str(vqav2_files["annotations"]))
    with pytest.raises(DataError, match="'questions' list.*annotations file") as error:
        dm.setup("test")
    assert error.value.json_path == str(vqav2_files["annotations"])


def test_vqav2_file_given_as_gqa(vqav2_files):
    with pytest.raises(DataError, match="expected GQA's questions file") as error:
        GQADataModule(str(vqav2_files["annotations"])).setup("test")
    assert error.value.json_path == str(vqav2_files["annotations"])


def test_record_without_answers(vqav2_files):
    path = vqav2_files["annotations"]
    content = json.loads(path.read_text())
    del content["annotations"][1]["answers"]
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"record id 42001 \(index 1\), field 'answers': missing"):
        VQAv2DataModule(str(vqav2_files["questions"]), str(path)).setup("test")


def test_question_without_annotation(vqav2_files):
    path = vqav2_files["annotations"]
    content = json.loads(path.read_text())
    content["annotations"] = content["annotations"][:2]
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match="record id 7000.*no annotation") as error:
        VQAv2DataModule(str(vqav2_files["questions"]), str(path)).setup("test")
    assert error.value.field == "question_id"


def test_missing_image(vqav2_files):
    (vqav2_files["images"] / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(DataError, match="record id 7000.*COCO_val2014_000000000007.jpg does not exist") as error:
        VQAv2DataModule(str(vqav2_files["questions"]), str(vqav2_files["annotations"])).setup("test")
    assert error.value.field == "image_id"


def test_is_for_evaluation_only(vqav2_files):
    dm = VQAv2DataModule(str(vqav2_files["questions"]), str(vqav2_files["annotations"]))
    with pytest.raises(ValueError, match="evaluation benchmark"):
        dm.setup("fit")


def test_submission_questions(vqav2_files, tmp_path):
    # val2014 (or any non-test-dev file): the questions file itself
    val = VQAv2DataModule(str(vqav2_files["questions"]))
    assert not val.is_test_dev() and val.submission_questions() == str(vqav2_files["questions"])
    # test-dev: every question of test2015 (EvalAI rejects less), found beside it, or named
    content = json.loads(vqav2_files["questions"].read_text())
    dev = vqav2_files["questions"].with_name("v2_OpenEnded_mscoco_test-dev2015_questions.json")
    dev.write_text(json.dumps(dict(content, data_subtype="test-dev2015")))
    dm = VQAv2DataModule(str(dev), image_folder=str(vqav2_files["images"]), image_prefix="COCO_val2014_")
    assert dm.is_test_dev() and dm.submission_questions() == str(dev.with_name("v2_OpenEnded_mscoco_test2015_questions.json"))
    named = VQAv2DataModule(str(dev), submission_questions_json=str(tmp_path / "all.json"))
    assert named.submission_questions() == str(tmp_path / "all.json")
    # predicting test-dev without the test2015 questions: told before the answers are made
    with pytest.warns(UserWarning, match=r"v2_OpenEnded_mscoco_test2015_questions\.json not found: predict writes the answers but no EvalAI"):
        dm.setup("predict")


def test_an_annotation_used_twice_is_refused(vqav2_files):
    path = vqav2_files["annotations"]
    content = json.loads(path.read_text())
    content["annotations"].append(dict(content["annotations"][1], multiple_choice_answer="7"))  # which one scores?
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as error:
        VQAv2DataModule(str(vqav2_files["questions"]), str(path)).setup("test")
    assert str(error.value).startswith(f"{path}, record id 42001 (index 3), field 'question_id': duplicate id: annotation 1")
