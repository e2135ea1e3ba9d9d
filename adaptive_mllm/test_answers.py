"""Every test answer, kept: one JSON line per question and budget beside the test report.

A sweep's table averages the answers away; the answers themselves let a user read the failures, rescore
them by another rule, or compare two schedulers question by question (a paired test, as
``bench/tiny_seeds.py`` does). Lines are written as batches finish, so a crash keeps what was answered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ANSWERS_FILE = "test_answers.jsonl"
COLUMNS = ("id", "question_kind", "budget", "answer", "reference", "score", "units", "flops_fraction")


def answers_path(directory: Path, rank: int = 0, world_size: int = 1) -> Path:
    """``test_answers.jsonl``, or ``test_answers.rank<r>.jsonl`` when several processes share the test."""
    return directory / (ANSWERS_FILE if world_size == 1 else f"test_answers.rank{rank}.jsonl")


class TestAnswerLog:
    """Appends one test's answers to ``path``, which it starts empty (it belongs to this test's report)."""

    __test__ = False  # not a pytest class

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle: IO[str] | None = open(path, "w", encoding="utf-8")

    def write(self, budget: float, out: Mapping[str, Any], batch: Mapping[str, Any], scores: Sequence[float] | None) -> None:
        """One line per question of ``batch`` answered at ``budget`` (``out``: ``AdaptiveMLLM.generate``'s
        output; ``scores``: each answer's score by the test's metric, None where the metric has none)."""
        assert self._handle is not None, "write after close"
        size = len(out["answers"])
        ids, kinds, references = (_column(batch, name, size) for name in ("ids", "question_kinds", "answers"))
        scores = [None] * size if scores is None else scores
        columns = zip(ids, kinds, out["answers"], references, scores, out["units_per_example"], out["flops_fractions"], strict=True)
        for id_, kind, answer, reference, score, units, flops in columns:
            row = (id_, kind, float(budget), answer, reference, score, units, flops)
            line = {name: _json_number(value) for name, value in zip(COLUMNS, row, strict=True)}
            self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_answers(path: Path) -> dict[tuple[float, Any], dict[str, Any]]:
    """A test's answers by (budget, question id); a clear error, naming file and line, for a line that is not
    one of ours (text that is not UTF-8 included), for a score that no metric writes (missing, not a number,
    NaN, outside [0, 1]: null is a metric without per-question scores), for a question answered twice at one
    budget (of two questions that share an id, a comparison would keep one), and for an empty file."""
    rows: dict[tuple[float, Any], dict[str, Any]] = {}
    first_line: dict[tuple[float, Any], int] = {}
    with open(path, "rb") as handle:  # decoded line by line: the codec's own error names no file and no line
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
                key = (float(row["budget"]), row["id"])
                earlier = first_line.setdefault(key, number)
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({error}): {raw.strip()[:120]!r}") from None
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: not a test answer line ({error}): {line.strip()[:120]!r}") from None
            problem = score_problem(row)
            if problem is not None:
                raise ValueError(f"{path}:{number}: field 'score' {problem}")
            if earlier != number:
                raise ValueError(
                    f"{path}:{number}: question {key[1]!r} answered again at budget {key[0]:g} (first on line {earlier}): "
                    "the test's questions share an id, and a comparison would keep only one of them"
                )
            rows[key] = row
    if not rows:
        raise ValueError(f"{path}: empty (0 bytes): no test answers in it")
    return rows


def score_problem(row: Mapping[str, Any]) -> str | None:
    """Why a line's ``score`` is none a metric writes (a number in [0, 1], or null where the metric has no
    per-question score); None when it is one."""
    if "score" not in row:
        return "missing"
    score = row["score"]
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, int | float):
        return f"{score!r} is not a number"
    if not math.isfinite(score):
        return f"{score!r} is not a finite number"
    if not 0 <= score <= 1:
        return f"{score!r} is outside [0, 1]"
    return None


def _column(batch: Mapping[str, Any], name: str, size: int) -> list:
    value = batch.get(name)
    if value is None:
        return [None] * size
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _json_number(value: Any) -> Any:
    """NaN (no plan, so no units) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
