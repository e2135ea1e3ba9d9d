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
    path.write_text(json.dumps({"id": "q1", "budget": 1.0, "score": 1.0}) + "\n" + json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:2: not a test answer line"):
        read_answers(path)


def test_batch_sizes_that_disagree_are_refused(tmp_path):
    log = TestAnswerLog(answers_path(tmp_path))
    with pytest.raises(ValueError):
        log.write(1.0, _out(["a", "b"]), {"ids": ["q1"]}, None)
    log.close()


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_bytes(json.dumps({"id": "q1", "budget": 1.0, "score": 1.0}).encode() + b"\n" + b'{"id": "q\xff2", "budget": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:2: not UTF-8 text"):
        read_answers(path)


def test_a_question_answered_twice_at_one_budget_is_refused(tmp_path):
    # two questions that share an id: keyed by (budget, id), one would be dropped unseen
    path = tmp_path / ANSWERS_FILE
    rows = [{"id": "q1", "budget": 1.0, "score": 1}, {"id": "q1", "budget": 0.5, "score": 0},
            {"id": "q2", "budget": 1.0, "score": None}, {"id": "q1", "budget": 1.0, "score": 1}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:4: question 'q1' answered again at budget 1 \(first on line 1\)"):
        read_answers(path)


@pytest.mark.parametrize(
    ("score", "says"),
    [
        (None, "missing"),  # the line has no score field at all
        ('"1"', "'1' is not a number"),
        ("true", "True is not a number"),
        ("[1]", r"\[1\] is not a number"),
        ("NaN", "nan is not a finite number"),
        ("Infinity", "inf is not a finite number"),
        ("7.0", r"7.0 is outside \[0, 1\]"),
        ("-0.5", r"-0.5 is outside \[0, 1\]"),
    ],
)
def test_a_score_no_metric_writes_names_file_line_and_field(tmp_path, score, says):
    path = tmp_path / ANSWERS_FILE
    second = '{"id": "q2", "budget": 1.0' + ("" if score is None else f', "score": {score}') + "}"
    path.write_text(json.dumps({"id": "q1", "budget": 1.0, "score": 1.0}) + "\n" + second + "\n")
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}:2: field 'score' {says}"):
        read_answers(path)


def test_every_score_a_metric_writes_is_read(tmp_path):
    # VQA's leave-one-out thirds, exact-match / POPE 0 or 1 (ints too), and null where the metric has none (MME)
    path = tmp_path / ANSWERS_FILE
    scores = [0.0, 1.0, 0, 1, 1 / 3, 2 / 3, 0.9, None]
    path.write_text("".join(json.dumps({"id": f"q{i}", "budget": 1.0, "score": s}) + "\n" for i, s in enumerate(scores)))
    assert [row["score"] for row in read_answers(path).values()] == scores


def test_an_empty_answers_file_says_it_is_empty(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{ANSWERS_FILE}: empty \(0 bytes\)"):
        read_answers(path)
