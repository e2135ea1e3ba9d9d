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


def _edit_problem(path, pid, edit):
    problems = json.loads(path.read_text())
    edit(problems, pid)
    path.write_text(json.dumps(problems))
    return path


@pytest.mark.parametrize(
    ("pid", "edit", "field", "reason"),
    [
        ("9", lambda p, pid: p.update({pid: ["oops"]}), "record", "expected a JSON object, got list"),
        ("9", lambda p, pid: p.update({pid: "oops"}), "record", "expected a JSON object, got str"),
        ("9", lambda p, pid: p[pid].update(image=5), "image", "expected a file name or null, got 5"),
        ("9", lambda p, pid: p[pid].update(image=""), "image", "expected a file name or null, got ''"),
        ("9", lambda p, pid: p[pid].update(hint=["x"]), "hint", "expected a string, got list"),
        ("9", lambda p, pid: p[pid].update(subject=3), "subject", "expected a string, got int"),
        ("9", lambda p, pid: p[pid].pop("question"), "question", "missing"),
        # 11 has no image: left out of SQA-IMG, but only once it reads as a problem
        ("11", lambda p, pid: p[pid].update(choices="run, dog"), "choices", "expected list, got str"),
        ("11", lambda p, pid: p[pid].update(answer="1"), "answer", "expected int, got str"),
    ],
    ids=["list", "string", "image-int", "image-empty", "hint-list", "subject-int", "no-question", "text-only-choices", "text-only-answer"],
)
def test_a_malformed_problem_is_refused_not_skipped(scienceqa_files, pid, edit, field, reason):
    path = _edit_problem(scienceqa_files["problems"], pid, edit)
    index = list(json.loads(path.read_text())).index(pid)  # the problem's place in problems.json
    with pytest.raises(DataError) as error:
        ScienceQADataModule(str(path)).setup("test")
    assert str(error.value).startswith(f"{path}, record id {pid!r} (index {index}), field {field!r}: {reason}")
    assert (error.value.json_path, error.value.record_id, error.value.field) == (str(path), pid, field)


@pytest.mark.parametrize("edit", [lambda raw: raw.update(image=None), lambda raw: raw.pop("image")], ids=["null", "absent"])
def test_a_well_formed_problem_without_image_is_left_out(scienceqa_files, first_batch, edit):
    path = _edit_problem(scienceqa_files["problems"], "9", lambda p, pid: edit(p[pid]))
    assert first_batch(ScienceQADataModule(str(path), batch_size=4))["ids"] == ["5"]
    assert first_batch(ScienceQADataModule(str(path), images_only=False, batch_size=4))["has_image"].tolist() == [True, False, False]


def test_a_split_with_no_image_problem_is_refused(scienceqa_files):
    path = scienceqa_files["splits"]
    path.write_text(json.dumps({"test": ["11"]}))
    with pytest.raises(DataError) as error:
        ScienceQADataModule(str(scienceqa_files["problems"])).setup("test")
    assert str(error.value) == (
        f"{path}, field 'test': no questions to evaluate: none of the split's 1 problems has an image (images_only keeps those)"
    )
    path.write_text(json.dumps({"test": []}))
    with pytest.raises(DataError, match=r"field 'test': no questions to evaluate: the split lists no problem"):
        ScienceQADataModule(str(scienceqa_files["problems"]), images_only=False).setup("test")
