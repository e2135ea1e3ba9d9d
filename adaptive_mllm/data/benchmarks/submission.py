"""Submission files for the benchmarks whose test labels only their servers hold: VQAv2 test-dev (EvalAI)
and the MMBench test split (OpenCompass). Each is written as LLaVA-1.5's conversion script writes it, from
the generated answers keyed by record id (the ``"id"`` of each ``predict`` output)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from adaptive_mllm.data.benchmarks.base import read_json, require
from adaptive_mllm.data.benchmarks.mmbench import read_mmbench_rows
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import evalai_answer

# convert_mmbench_for_submission.py drops these columns and puts "prediction" at this position
MMBENCH_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
MMBENCH_PREDICTION_POSITION = 6


def _question_id(record_id: str | int, what: str) -> int:
    try:
        return int(record_id)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: record id {record_id!r} is not an integer question id") from error


def write_vqav2_submission(path: str | Path, answers: Mapping[str | int, str], questions_json: str | None = None) -> Path:
    """EvalAI's VQAv2 result file, ``[{"question_id": int, "answer": str}, ...]``, each answer through the
    EvalAI answer processor, as LLaVA-1.5's convert_vqav2_for_submission.py writes it.

    Args:
        path: the JSON file to write.
        answers: generated answer per question id (VQAv2 record ids are question ids).
        questions_json: a VQAv2 questions file; every question of it is written, in its order, with ""
            where there is no answer (as LLaVA does: EvalAI's test-dev phase expects every question of
            ``v2_OpenEnded_mscoco_test2015_questions.json``). None: the answered questions only.
    """
    by_id = {_question_id(key, "VQAv2 submission"): text for key, text in answers.items()}
    if questions_json is None:
        order = list(by_id)
    else:
        content = read_json(questions_json)
        if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
            raise DataError.at(questions_json, "expected a VQAv2 questions file: a JSON object with a 'questions' list")
        order = [require(raw, "question_id", int, questions_json, None, i) for i, raw in enumerate(content["questions"])]
        unknown = sorted(set(by_id) - set(order))
        if unknown:
            raise ValueError(f"{len(unknown)} answered question ids are not in {questions_json}, e.g. {unknown[:5]}")
    results = [{"question_id": qid, "answer": evalai_answer(by_id[qid].strip()) if qid in by_id else ""} for qid in order]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle)
    return path


def _mmbench_row_index(record_id: str | int) -> int | None:
    """The TSV row a record answers: ``"12"`` or ``"12-0"`` (the options in the row's order) -> 12; the
    other rotations (``"12-1"``, ...) None: the sheet holds each row's answer with its own option order."""
    text = str(record_id)
    index, _, shift = text.partition("-")
    if shift not in ("", "0"):
        return None
    return _question_id(index, "MMBench submission")


def write_mmbench_submission(path: str | Path, answers: Mapping[str | int, str], tsv: str) -> Path:
    """MMBench's submission sheet, as LLaVA-1.5's convert_mmbench_for_submission.py writes it: every row of
    the TSV, without the columns hint, category, source, image, comment and l2-category, with a
    ``prediction`` column (the generated answer as it is; empty where there is none) at the seventh place.

    Args:
        path: ``.xlsx`` (the format the MMBench server takes) or ``.tsv``.
        answers: generated answer per record id (``"<index>"``, or ``"<index>-<shift>"`` from a circular
            run, of which shift 0 is used).
        tsv: the MMBench TSV the answers are for.
    """
    path = Path(path)
    if path.suffix not in (".xlsx", ".tsv"):
        raise ValueError(f"MMBench submission: write a .xlsx or a .tsv file, not {path.name!r}")
    rows = read_mmbench_rows(tsv)
    by_index: dict[int, str] = {}
    for key, text in answers.items():
        index = _mmbench_row_index(key)
        if index is not None:
            by_index[index] = text
    row_indices = [_question_id(row["index"], f"MMBench TSV {tsv}") for row in rows]
    unknown = sorted(set(by_index) - set(row_indices))
    if unknown:
        raise ValueError(f"{len(unknown)} answered indices are not rows of {tsv}, e.g. {unknown[:5]}")
    kept = [column for column in rows[0] if column not in MMBENCH_DROPPED_COLUMNS] if rows else ["index"]
    columns = list(kept)
    columns.insert(min(MMBENCH_PREDICTION_POSITION, len(columns)), "prediction")
    table = []
    for index, row in zip(row_indices, rows, strict=True):
        values = {column: (row.get(column) or None) for column in kept}
        values["index"] = index
        values["prediction"] = by_index.get(index)
        table.append([values[column] for column in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tsv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(columns)
            writer.writerows([["" if value is None else value for value in line] for line in table])
        return path
    from openpyxl import Workbook  # only the .xlsx sheet needs it

    book = Workbook()
    sheet = book.active
    sheet.append(columns)
    for line in table:
        sheet.append(line)
    book.save(path)
    return path
