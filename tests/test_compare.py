"""`adaptive-mllm compare`: the sign test, the pairing of two tests' answers, and the command's errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from adaptive_mllm.cli import main as cli_main
from adaptive_mllm.compare import compare, read_run, sign_test_p
from adaptive_mllm.compare import main as compare_main
from adaptive_mllm.test_answers import ANSWERS_FILE


def test_sign_test_matches_enumeration() -> None:
    # independent: every one of the 2^n equally likely win / loss sequences of n differing questions, the
    # p-value being the share at least as far from an even split as the one seen
    for differ in range(0, 11):
        for wins in range(differ + 1):
            seen = abs(wins - differ / 2)
            extreme = sum(abs(sum(seq) - differ / 2) >= seen for seq in itertools.product((0, 1), repeat=differ))
            assert sign_test_p(wins, differ - wins) == pytest.approx(extreme / 2**differ), (wins, differ)
    assert sign_test_p(0, 6) == pytest.approx(2 / 64)  # six of six one way: the smallest tail doubled


def _write(run: Path, scores: dict[float, list[float | None]], name: str = ANSWERS_FILE) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": i, "budget": b, "score": score}) for b, row in scores.items() for i, score in enumerate(row)]
    (run / name).write_text("\n".join(lines) + "\n")
    return run


def test_two_runs_compared_question_by_question(tmp_path: Path, capsys) -> None:
    # at 1.0 the runs disagree on 40 questions, 20 each way: same score, no difference; at 0.5 A is right on
    # 12 questions B gets wrong and B on none: A higher (p = 2 / 2^12)
    a = _write(tmp_path / "a", {1.0: [1] * 20 + [0] * 20 + [1] * 60, 0.5: [1] * 12 + [0] * 88})
    b = _write(tmp_path / "b", {1.0: [0] * 20 + [1] * 20 + [1] * 60, 0.5: [0] * 100})
    rows = compare_main([str(a), str(b), "--out", str(tmp_path / "new" / "compare.md")])  # its folder made
    assert (tmp_path / "new" / "compare.md").is_file()
    high, low = rows
    assert (high["budget"], high["A higher"], high["B higher"], high["A"], high["B"]) == (1.0, 20, 20, 0.8, 0.8)
    assert high["p"] == 1.0 and high["better"] == "neither"
    assert (low["A higher"], low["B higher"]) == (12, 0) and low["p"] == pytest.approx(2 / 2**12)
    assert low["better"] == "A"
    table = (tmp_path / "new" / "compare.md").read_text()
    assert "neither" in table and "| 0.5 " in table and "neither" in capsys.readouterr().out


def test_the_files_of_every_process_are_read(tmp_path: Path) -> None:
    run = _write(tmp_path / "ddp", {1.0: [1, 0]}, "test_answers.rank0.jsonl")
    (run / "test_answers.rank1.jsonl").write_text(json.dumps({"id": 7, "budget": 1.0, "score": 1}) + "\n")
    assert set(read_run(run)) == {(1.0, 0), (1.0, 1), (1.0, 7)}


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no {ANSWERS_FILE}"):
        read_run(tmp_path)
    a = read_run(_write(tmp_path / "a", {1.0: [1, 0, 1]}))
    with pytest.raises(ValueError, match=r"different questions \(3 vs 2"):
        compare(a, read_run(_write(tmp_path / "b", {1.0: [1, 0]})))
    with pytest.raises(ValueError, match="share no budget"):
        compare(a, read_run(_write(tmp_path / "c", {0.5: [1, 0, 1]})))
    with pytest.raises(ValueError, match="no per-question score"):
        compare(a, read_run(_write(tmp_path / "d", {1.0: [None, None, None]})))
    stopped = _write(tmp_path / "stopped", {1.0: [1, 0]})
    (stopped / "INCOMPLETE").write_text("test stopped by SIGTERM\ntest_answers*.jsonl here hold only part of the answers\n")
    with pytest.raises(ValueError, match=r"INCOMPLETE: the test that wrote these answers did not finish \(test stopped by SIGTERM\)"):
        read_run(stopped)
    with pytest.raises(SystemExit):  # through the command's dispatch
        cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--alpha", "1.5"])
    cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "a")])  # a run against itself: no question differs


def test_same_ids_for_other_questions_are_refused_and_a_lone_budget_is_named(tmp_path: Path, capsys) -> None:
    def run(name: str, references: list[str], budgets: tuple[float, ...] = (1.0,)) -> dict:
        path = tmp_path / name
        path.mkdir()
        rows = [{"id": i, "budget": b, "score": 1, "reference": ref, "question_kind": "colour"}
                for b in budgets for i, ref in enumerate(references)]  # fmt: skip
        (path / ANSWERS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return read_run(path)

    seed0 = run("seed0", ["red", "blue"], (1.0, 0.5))
    with pytest.raises(ValueError, match=r"question 1 at budget 1: reference 'blue' in A, 'green' in B; .*different questions"):
        compare(seed0, run("seed7", ["red", "green"]))
    rows = compare(seed0, run("same", ["red", "blue"]))
    assert [row["budget"] for row in rows] == [1.0]
    assert "only A answered at budget(s) 0.5: not compared" in capsys.readouterr().out


def test_an_answers_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {1.0: [1, 0, 1]})
    b = _write(tmp_path / "b", {1.0: [1, 1, 1]})
    (b / ANSWERS_FILE).write_bytes((b / ANSWERS_FILE).read_bytes().replace(b'"id": 2', b'"id": "\xff"'))
    with pytest.raises(ValueError, match=rf"{b / ANSWERS_FILE}:3: not UTF-8 text"):
        cli_main(["compare", str(a), str(b)])


def test_out_never_replaces_a_file_unasked(tmp_path: Path, capsys) -> None:
    # `--out runs/a/test_answers.jsonl` replaced a run's answers with the table
    a = _write(tmp_path / "a", {1.0: [1, 0, 1]})
    answers = a / ANSWERS_FILE
    before = answers.read_bytes()
    with pytest.raises(SystemExit):
        compare_main([str(a), str(a), "--out", str(answers)])
    assert "exists; choose another path, or pass --overwrite" in capsys.readouterr().err
    assert answers.read_bytes() == before
    with pytest.raises(SystemExit):
        compare_main([str(a), str(a), "--out", str(a)])
    assert "is a directory" in capsys.readouterr().err
    table = tmp_path / "table.md"
    table.write_text("old\n")
    compare_main([str(a), str(a), "--out", str(table), "--overwrite"])
    assert table.read_text().startswith("| budget")


@pytest.mark.parametrize(
    ("score", "says"),
    [(None, "missing"), ('"1"', "'1' is not a number"), ("NaN", "nan is not a finite number"), ("7.0", r"7.0 is outside \[0, 1\]")],
)
def test_a_score_no_metric_writes_is_named_with_file_line_and_field(tmp_path: Path, score: str | None, says: str) -> None:
    # a missing score was KeyError: 'score', a string one a TypeError from `>`, 7.0 and NaN were compared as scores
    a = _write(tmp_path / "a", {1.0: [1, 0, 1]})
    b = _write(tmp_path / "b", {1.0: [1, 0, 1]})
    lines = (b / ANSWERS_FILE).read_text().splitlines()
    lines[1] = '{"id": 1, "budget": 1.0' + ("" if score is None else f', "score": {score}') + "}"
    (b / ANSWERS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{b / ANSWERS_FILE}:2: field 'score' {says}"):
        cli_main(["compare", str(a), str(b)])


def test_an_empty_answers_file_is_named_empty(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {1.0: [1, 0, 1]})
    empty = tmp_path / "b" / ANSWERS_FILE
    empty.parent.mkdir()
    empty.write_bytes(b"")
    for given in (empty, empty.parent):  # the file, or its run directory
        with pytest.raises(ValueError, match=rf"{empty}: empty \(0 bytes\)"):
            cli_main(["compare", str(a), str(given)])


def test_a_process_that_answered_nothing_beside_others_is_passed_over(tmp_path: Path) -> None:
    # one process of a DDP test got only padding (questions another process answers): its file stays empty
    run = _write(tmp_path / "ddp", {1.0: [1, 0]}, "test_answers.rank0.jsonl")
    (run / "test_answers.rank1.jsonl").write_bytes(b"")
    assert set(read_run(run)) == {(1.0, 0), (1.0, 1)}
    (run / "test_answers.rank0.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"test_answers.rank0.jsonl: empty \(0 bytes\)"):
        read_run(run)


def test_overwrite_replaces_a_link_at_out_never_the_file_it_points_to(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {1.0: [1, 0, 1]})
    report = tmp_path / "other-run" / "report.md"
    report.parent.mkdir()
    report.write_text("another run's report\n")
    link = tmp_path / "table.md"
    link.symlink_to(report)
    compare_main([str(a), str(a), "--out", str(link), "--overwrite"])
    assert report.read_text() == "another run's report\n"  # it was written through the link
    assert not link.is_symlink() and link.read_text().startswith("| budget")
