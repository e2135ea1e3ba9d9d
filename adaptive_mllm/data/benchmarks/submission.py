"""Submission files for the benchmarks whose test labels only their servers hold: VQAv2 test-dev (EvalAI)
and the MMBench test split (OpenCompass). Each is written as LLaVA-1.5's conversion script writes it, from
the generated answers keyed by record id (the ``"id"`` of each ``predict`` output)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from adaptive_mllm.data.benchmarks.base import read_json, require
from adaptive_mllm.data.benchmarks.mmbench import CIRCULAR_OFFSET, MMBenchDataModule, read_mmbench_rows
from adaptive_mllm.data.benchmarks.vqav2 import SUBMISSION_FLAG, TEST2015_QUESTIONS, VQAv2DataModule
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import evalai_answer
from adaptive_mllm.reporting import write_durably, write_text_durably

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

    The file is written whole or not at all (a temporary file beside it, synced, renamed over it): a failure, a
    full disk say, leaves no half file under ``path`` and raises an OSError that names it.
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
    write_text_durably(path, json.dumps(results))  # whole or not at all: a cut file is what a user would upload
    rank_zero_info(
        f"VQAv2 submission {path}: {len(by_id)} of {len(order)} questions answered, {len(order) - len(by_id)} filled with \"\""
    )
    return path


def _mmbench_row_index(record_id: str | int) -> int | None:
    """The TSV row a record answers: ``"12"`` or ``"12-0"`` (the options in the row's order) -> 12; the
    other rotations (``"12-1"``, ...) None: the sheet holds each row's answer with its own option order."""
    text = str(record_id)
    index, _, shift = text.partition("-")
    if shift not in ("", "0"):
        return None
    return _question_id(index, "MMBench submission")


def write_mmbench_submission(path: str | Path, answers: Mapping[str | int, str], tsv: str, circular: bool | None = None) -> Path:
    """MMBench's submission sheet, as LLaVA-1.5's convert_mmbench_for_submission.py writes it: every row of
    the TSV, without the columns hint, category, source, image, comment and l2-category, with a
    ``prediction`` column (the generated answer as it is; empty where there is none) at the seventh place.

    Args:
        path: ``.xlsx`` (the format the MMBench server takes) or ``.tsv``.
        answers: generated answer per record id (``"<index>"``, or ``"<index>-<shift>"`` from a circular
            run, of which shift 0 is used).
        tsv: the MMBench TSV the answers are for.
        circular: the run's ``MMBenchDataModule.circular`` where known, named in the warning on rows left
            unanswered (circular=False on a TSV that holds the rotations asks only its original rows).

    The counts of answered and unanswered rows are logged; unanswered rows (a blank prediction, which
    MMBench's server scores wrong) give a warning. The sheet is written whole or not at all, as
    :func:`write_vqav2_submission` writes its file.
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
    _report_unanswered(path, row_indices, by_index, circular)
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all (a temporary file renamed over the name): a cut sheet is what a user would upload
    if path.suffix == ".tsv":
        text = io.StringIO()
        writer = csv.writer(text, delimiter="\t")
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in line] for line in table])
        return write_text_durably(path, text.getvalue())
    from openpyxl import Workbook  # only the .xlsx sheet needs it

    book = Workbook()
    sheet = book.active
    sheet.append(columns)
    for line in table:
        sheet.append(line)
    sheet_bytes = io.BytesIO()  # made whole in memory (a few MB): a failed write leaves no half-written zip behind
    book.save(sheet_bytes)
    return write_durably(path, lambda handle: handle.write(sheet_bytes.getvalue()))


def _report_unanswered(path: Path, row_indices: list[int], by_index: Mapping[int, str], circular: bool | None) -> None:
    """Logs the answered / blank counts of an MMBench sheet; warns where rows are blank."""
    unanswered = [index for index in row_indices if index not in by_index]
    total = len(row_indices)
    rank_zero_info(f"MMBench submission {path}: {total - len(unanswered)} of {total} rows answered, {len(unanswered)} blank")
    if not unanswered:
        return
    message = (
        f"MMBench submission {path}: {len(unanswered)} of {total} rows have no answer (a blank prediction, which the "
        f"server scores wrong), e.g. indices {unanswered[:5]}"
    )
    rotated = sum(index >= CIRCULAR_OFFSET for index in unanswered)
    if rotated:
        who = "circular=false asks" if circular is False else "a run with circular=false asks"
        message += (
            f"; {rotated} of them are rotated copies (index >= {CIRCULAR_OFFSET}) in a TSV that holds the rotations: "
            f"{who} its original rows only; predict with --data.init_args.circular=true to answer every row"
        )
    rank_zero_warn(message)


def write_submission(datamodule: object, stem: str | Path, answers: Mapping[str | int, str]) -> Path | None:
    """The server's file for ``predict``'s answers on a benchmark whose labels only its server holds (VQAv2:
    ``<stem>.json``; MMBench: ``<stem>.xlsx``); None for any other datamodule, and (with a warning) for VQAv2
    where the questions file the submission must cover (:meth:`VQAv2DataModule.submission_questions`: for
    test-dev, every question of test2015) is missing: EvalAI rejects a test-dev file without them."""
    if isinstance(datamodule, VQAv2DataModule):
        questions = datamodule.submission_questions()
        if not Path(questions).is_file():
            rank_zero_warn(
                f"VQAv2 submission {stem}.json not written: {questions} not found. EvalAI's VQAv2 test-dev phase rejects a "
                f"result file without every question of {TEST2015_QUESTIONS} (\"\" where unanswered). Put that file there or "
                f"pass {SUBMISSION_FLAG}=PATH, or write the file from the answers with "
                "adaptive_mllm.data.benchmarks.write_vqav2_submission"
            )
            return None
        return write_vqav2_submission(f"{stem}.json", answers, questions)
    if isinstance(datamodule, MMBenchDataModule):
        return write_mmbench_submission(f"{stem}.xlsx", answers, datamodule.tsv, datamodule.circular)
    return None
