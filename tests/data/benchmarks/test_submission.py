"""Submission files written and read back: VQAv2 for EvalAI, MMBench's sheet (.xlsx and .tsv)."""

from __future__ import annotations

import csv
import json

import pytest
from openpyxl import load_workbook

from adaptive_mllm.data.benchmarks import write_mmbench_submission, write_vqav2_submission


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
    partial = write_mmbench_submission(tmp_path / "partial.tsv", {"1": "D"}, tsv)
    with open(partial, encoding="utf-8", newline="") as handle:
        assert [row[6] for row in csv.reader(handle, delimiter="\t")] == ["prediction", "", "D"]
    with pytest.raises(ValueError, match=r"answered indices are not rows of .*e\.g\. \[7\]"):
        write_mmbench_submission(tmp_path / "x.xlsx", {"7": "A"}, tsv)
    with pytest.raises(ValueError, match=r"a \.xlsx or a \.tsv file, not 'x\.csv'"):
        write_mmbench_submission(tmp_path / "x.csv", {"0": "A"}, tsv)
