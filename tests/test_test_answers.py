"""The test's answers file: one line per question and budget, readable back, a clear error for a foreign line."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.test_answers import ANSWERS_FILE, TestAnswerLog, answers_path, read_answers


def _out(answers: list[str]) -> dict:
    return {"answers": answers, "units_per_example": [3.0, float("nan")][: len(answers)], "flops_fractions": [0.5, 1.0][: len(answers)]}


def test_lines_per_question_and_budget_read_back(tmp_path):
    path = answers_path(tmp_path)
    assert path.name == ANSWERS_FILE
    log = TestAnswerLog(path)
    batch = {"ids": ["q1", "q2"], "question_kinds": ["color", "count"], "answers": ["red", "2"]}
    log.write(1.0, _out(["red", "3"]), batch, [1.0, 0.0])
    log.write(0.5, _out(["blue", "2"]), batch, None)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[1] == {"id": "q2", "question_kind": "count", "budget": 1.0, "answer": "3", "reference": "2",
                        "score": 0.0, "units": None, "flops_fraction": 1.0}  # NaN units (no plan) as JSON null
    assert lines[2]["score"] is None  # a metric without per-question scores
    rows = read_answers(path)
    assert rows[(0.5, "q1")]["answer"] == "blue" and rows[(1.0, "q1")]["score"] == 1.0


def test_a_new_test_starts_the_file_empty(tmp_path):
    path = answers_path(tmp_path)
    for answer in ("first", "second"):
        log = TestAnswerLog(path)
        log.write(1.0, _out([answer]), {"ids": ["q1"]}, None)
        log.close()
    assert [json.loads(line)["answer"] for line in path.read_text().splitlines()] == ["second"]


def test_each_process_writes_its_own_file(tmp_path):
    assert answers_path(tmp_path, rank=1, world_size=2).name == "test_answers.rank1.jsonl"


def test_a_foreign_line_names_file_and_line(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_text(json.dumps({"id": "q1", "budget": 1.0}) + "\n" + json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:2: not a test answer line"):
        read_answers(path)


def test_batch_sizes_that_disagree_are_refused(tmp_path):
    log = TestAnswerLog(answers_path(tmp_path))
    with pytest.raises(ValueError):
        log.write(1.0, _out(["a", "b"]), {"ids": ["q1"]}, None)
    log.close()


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_bytes(json.dumps({"id": "q1", "budget": 1.0}).encode() + b"\n" + b'{"id": "q\xff2", "budget": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:2: not UTF-8 text"):
        read_answers(path)


def test_a_question_answered_twice_at_one_budget_is_refused(tmp_path):
    # two questions that share an id: keyed by (budget, id), one would be dropped unseen
    path = tmp_path / ANSWERS_FILE
    rows = [{"id": "q1", "budget": 1.0}, {"id": "q1", "budget": 0.5}, {"id": "q2", "budget": 1.0}, {"id": "q1", "budget": 1.0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:4: question 'q1' answered again at budget 1 \(first on line 1\)"):
        read_answers(path)
