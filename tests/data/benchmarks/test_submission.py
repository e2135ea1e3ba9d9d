"""Submission files written and read back: VQAv2 for EvalAI, MMBench's sheet (.xlsx and .tsv)."""

from __future__ import annotations

import csv
import json
import logging

import lightning as L
import pytest
import torch
from openpyxl import load_workbook

from adaptive_mllm.data.benchmarks import (
    VQAv2DataModule,
    write_mmbench_submission,
    write_submission,
    write_vqav2_submission,
)
from adaptive_mllm.prediction_writer import INCOMPLETE, PredictionWriter
from tests.test_reporting import fill_disk


def test_vqav2_answers_through_the_evalai_processor(vqav2_files, tmp_path):
    answers = {"42000": "The man's hat.", "7000": " Yes\n"}
    path = write_vqav2_submission(tmp_path / "out" / "vqav2.json", answers, str(vqav2_files["questions"]))
    # by hand, EvalAI's processor: "the man 's hat." -> article and period dropped; every question of the
    # file in its order (42000, 42001, 7000), "" for the unanswered one, as convert_vqav2_for_submission.py
    assert json.loads(path.read_text()) == [
        {"question_id": 42000, "answer": "man 's hat"},
        {"question_id": 42001, "answer": ""},
        {"question_id": 7000, "answer": "yes"},
    ]
    only = write_vqav2_submission(tmp_path / "only.json", {42001: "Two,"})  # no questions file: answered ones
    assert json.loads(only.read_text()) == [{"question_id": 42001, "answer": "2"}]


def test_vqav2_bad_ids(vqav2_files, tmp_path):
    with pytest.raises(ValueError, match=r"answered question ids are not in .*e\.g\. \[99\]"):
        write_vqav2_submission(tmp_path / "x.json", {"99": "yes"}, str(vqav2_files["questions"]))
    with pytest.raises(ValueError, match="record id 'adversarial-1' is not an integer"):
        write_vqav2_submission(tmp_path / "x.json", {"adversarial-1": "yes"})


def _test_dev_layout(vqav2_files, test2015: bool = True):
    """The stand-in as test-dev (42000, 7000) beside test2015 (the three, and 42002): questions only."""
    root = vqav2_files["questions"].parent
    content = json.loads(vqav2_files["questions"].read_text())
    dev = dict(content, data_subtype="test-dev2015", questions=[q for q in content["questions"] if q["question_id"] != 42001])
    full = dict(content, data_subtype="test2015", questions=[*content["questions"], {"image_id": 7, "question": "Red?", "question_id": 42002}])
    if test2015:
        (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(full))
    path = root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    path.write_text(json.dumps(dev))
    return path


def _test_dev_module(path, vqav2_files, **kwargs):
    # the stand-in's images are val2014's: named here, so the test-dev files need no test2015 folder
    return VQAv2DataModule(str(path), image_folder=str(vqav2_files["images"]), image_prefix="COCO_val2014_", **kwargs)


class Echo(L.LightningModule):
    """Answers "Yes." to every question, as a model's predict_step rows."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return [{"id": i, "question": "q", "answer": "Yes.", "budget": 1.0, "units": 1.0, "flops_fraction": 1.0} for i in batch["ids"]]


def test_vqav2_test_dev_predict_submits_every_test2015_question(vqav2_files, bench_processor, tmp_path, caplog):
    dm = _test_dev_module(_test_dev_layout(vqav2_files), vqav2_files, batch_size=1)
    dm.set_input_processor(bench_processor)
    writer = PredictionWriter(str(tmp_path / "answers"))
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
    handler_owner = logging.getLogger("lightning.pytorch")  # Lightning's messages may not reach the root logger
    handler_owner.addHandler(caplog.handler)
    try:
        trainer.predict(Echo(), datamodule=dm, return_predictions=False)
    finally:
        handler_owner.removeHandler(caplog.handler)
    # EvalAI's test-dev phase takes only a file with every test2015 question: those not in test-dev get ""
    assert json.loads((tmp_path / "answers" / "submission-budget-1.json").read_text()) == [
        {"question_id": 42000, "answer": "yes"},
        {"question_id": 42001, "answer": ""},
        {"question_id": 7000, "answer": "yes"},
        {"question_id": 42002, "answer": ""},
    ]
    assert '2 of 4 questions answered, 2 filled with ""' in caplog.text


def test_a_submission_not_written_leaves_predict_incomplete_and_no_half_file(vqav2_files, bench_processor, tmp_path, monkeypatch):
    """Audit 2026-12 problem 2: predict wrote predict_done.json and removed INCOMPLETE, then the submission file in
    place: on a full disk a cut submission-budget-1.json (the file a user uploads) lay in a directory said done."""
    dm = _test_dev_module(_test_dev_layout(vqav2_files), vqav2_files, batch_size=1)
    dm.set_input_processor(bench_processor)
    answers = tmp_path / "answers"
    writer = PredictionWriter(str(answers))
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
    fill_disk(monkeypatch, "submission-budget-1.json", room=40)
    expected = r"could not write .*submission-budget-1\.json: the disk is full \(ENOSPC"
    with pytest.warns(UserWarning, match=r"predict stopped by OSError: .* the answers in .* are complete, but not every submission file"):
        with pytest.raises(OSError, match=expected):
            trainer.predict(Echo(), datamodule=dm, return_predictions=False)
    assert sorted(path.name for path in answers.iterdir()) == [INCOMPLETE, "budget-1.jsonl"]  # no half file, no done marker
    assert len((answers / "budget-1.jsonl").read_text().splitlines()) == 2  # every answer, kept
    assert (answers / INCOMPLETE).read_text().splitlines()[1] == (
        "the budget-*.jsonl files here hold every answer, but not every submission file (submission-budget-*) was written; "
        "those here are whole"
    )


@pytest.mark.parametrize("name", ["vqav2.json", "mmbench.xlsx", "mmbench.tsv"])
def test_a_submission_file_is_written_whole_or_not_at_all(vqav2_files, mmbench_files, tmp_path, monkeypatch, name):
    path = tmp_path / "out" / name
    path.parent.mkdir()
    path.write_text("an earlier file\n")
    fill_disk(monkeypatch, name, room=20)
    with pytest.raises(OSError, match=rf"could not write {path}: the disk is full \(ENOSPC: No space left on device\)"):
        if name.startswith("vqav2"):
            write_vqav2_submission(path, {"42000": "yes", "7000": "no"}, str(vqav2_files["questions"]))
        else:
            write_mmbench_submission(path, {"0": "B", "1": "D"}, str(mmbench_files["tsv"]))
    assert path.read_text() == "an earlier file\n" and [p.name for p in path.parent.iterdir()] == [name]  # as it was, nothing beside


def test_vqav2_test_dev_without_test2015_writes_no_submission(vqav2_files, tmp_path):
    dev = _test_dev_layout(vqav2_files, test2015=False)
    dm = _test_dev_module(dev, vqav2_files)
    assert dm.is_test_dev() and dm.submission_questions() == str(dev.with_name("v2_OpenEnded_mscoco_test2015_questions.json"))
    expected = r"not written: .*v2_OpenEnded_mscoco_test2015_questions\.json not found.*--data\.init_args\.submission_questions_json"
    with pytest.warns(UserWarning, match=expected):
        assert write_submission(dm, tmp_path / "sub", {"42000": "yes", "7000": "no"}) is None
    assert not (tmp_path / "sub.json").exists()  # a file EvalAI would reject is not written
    # the test2015 questions named where they are
    elsewhere = tmp_path / "elsewhere" / "all.json"
    _test_dev_layout(vqav2_files)
    elsewhere.parent.mkdir()
    (dev.with_name("v2_OpenEnded_mscoco_test2015_questions.json")).rename(elsewhere)
    named = _test_dev_module(dev, vqav2_files, submission_questions_json=str(elsewhere))
    path = write_submission(named, tmp_path / "sub", {"42000": "yes", "7000": "no"})
    assert [row["question_id"] for row in json.loads(path.read_text())] == [42000, 42001, 7000, 42002]


# convert_mmbench_for_submission.py's sheet for the stand-in TSV (columns index, question, hint, A-D, answer,
# category, image, source, l2-category, comment, split): six columns dropped, "prediction" seventh
SHEET_COLUMNS = ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]


@pytest.mark.parametrize("suffix", [".xlsx", ".tsv"])
def test_mmbench_sheet_read_back(mmbench_files, tmp_path, suffix):
    # a circular run's records: shift 0 holds each row's own option order; other shifts are not submitted
    answers = {"0-0": "B", "0-1": "A", "1-0": "The answer is D", "1-2": "B"}
    path = write_mmbench_submission(tmp_path / f"sheet{suffix}", answers, str(mmbench_files["tsv"]))
    if suffix == ".xlsx":
        rows = list(load_workbook(path).active.iter_rows(values_only=True))
        empty = None
    else:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = [tuple(row) for row in csv.reader(handle, delimiter="\t")]
        empty = ""
    index = (0, 1) if suffix == ".xlsx" else ("0", "1")
    assert list(rows[0]) == SHEET_COLUMNS
    assert rows[1] == (index[0], "Which shape is in the top left?", "circle", "square", "triangle", empty, "B", "B", "dev")
    assert rows[2] == (index[1], "Which scene is this?", "beach", "forest", "city", "grid", "The answer is D", "D", "dev")


def test_mmbench_sheet_errors(mmbench_files, tmp_path):
    tsv = str(mmbench_files["tsv"])
    with pytest.warns(UserWarning, match=r"1 of 2 rows have no answer.*e\.g\. indices \[0\]"):
        partial = write_mmbench_submission(tmp_path / "partial.tsv", {"1": "D"}, tsv)
    with open(partial, encoding="utf-8", newline="") as handle:
        assert [row[6] for row in csv.reader(handle, delimiter="\t")] == ["prediction", "", "D"]
    with pytest.raises(ValueError, match=r"answered indices are not rows of .*e\.g\. \[7\]"):
        write_mmbench_submission(tmp_path / "x.xlsx", {"7": "A"}, tsv)
    with pytest.raises(ValueError, match=r"a \.xlsx or a \.tsv file, not 'x\.csv'"):
        write_mmbench_submission(tmp_path / "x.csv", {"0": "A"}, tsv)
