"""ScienceQA-IMG loader on its stand-in: the IMG subset of the test split, options and letters."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import OPTION_LETTER, ScienceQADataModule
from adaptive_mllm.metrics import MultipleChoiceAccuracy


def test_reads_the_img_subset(scienceqa_files, first_batch, prompts_of):
    dm = ScienceQADataModule(str(scienceqa_files["problems"]), batch_size=4)
    batch = first_batch(dm)
    assert batch["ids"] == ["5", "9"]  # 11 has no image, 2 is a training problem
    assert batch["answers"] == ["B", "A"]
    assert batch["num_choices"] == [3, 2]
    assert batch["question_kinds"] == ["natural science", "social science"]
    assert prompts_of(dm) == [
        f"<image>\nContext: The figure shows shapes.\nWhich shape is red?\nA. circle\nB. square\nC. triangle\n{OPTION_LETTER}",
        f"<image>\nWhich is on the map?\nA. a river\nB. a road\n{OPTION_LETTER}",
    ]


def test_all_test_problems(scienceqa_files, first_batch):
    dm = ScienceQADataModule(str(scienceqa_files["problems"]), images_only=False, batch_size=4)
    batch = first_batch(dm)
    assert batch["ids"] == ["5", "9", "11"]
    assert batch["has_image"].tolist() == [True, True, False]
    assert batch["pixel_values"].shape[0] == 2


def test_metric(scienceqa_files, first_batch):
    dm = ScienceQADataModule(str(scienceqa_files["problems"]), batch_size=4)
    batch = first_batch(dm)
    metric = dm.make_metric()
    assert isinstance(metric, MultipleChoiceAccuracy) and metric.rule == "scienceqa"
    # eval_science_qa.py: "B. square" parses as B (right); "C" is past the 2 options of problem 9 (wrong)
    metric.update(["B. square", "C"], batch)
    scores = metric.compute()
    assert scores["overall"].item() == 0.5 and scores["unparsable"].item() == 1
    assert scores["natural science"].item() == 1.0 and scores["social science"].item() == 0.0
    metric.reset()
    metric.update(["(B) square", "The answer is A."], batch)  # "(B) square" is none of the script's forms
    assert metric.compute()["overall"].item() == 0.5


def test_answer_out_of_range(scienceqa_files):
    path = scienceqa_files["problems"]
    problems = json.loads(path.read_text())
    problems["9"]["answer"] = 2
    path.write_text(json.dumps(problems))
    with pytest.raises(DataError, match=r"record id '9' \(index 1\), field 'answer': option index 2 out of range"):
        ScienceQADataModule(str(path)).setup("test")


def test_split_lists_an_unknown_pid(scienceqa_files):
    path = scienceqa_files["splits"]
    path.write_text(json.dumps({"test": ["5", "404"]}))
    with pytest.raises(DataError, match="pid '404' is not in") as error:
        ScienceQADataModule(str(scienceqa_files["problems"])).setup("test")
    assert error.value.json_path == str(path)


def test_missing_splits_file(scienceqa_files):
    scienceqa_files["splits"].unlink()
    with pytest.raises(DataError, match="pid_splits.json: file not found"):
        ScienceQADataModule(str(scienceqa_files["problems"])).setup("test")
