"""`adaptive-mllm compare RUN_A RUN_B`: two tests of the same questions, question by question.

Two scores 1 point apart on 2,000 questions may be chance or not, depending on how often the two runs
disagree. Both tests' ``test_answers.jsonl`` pair every answer with its counterpart; per budget this prints
the scores, how many questions each run scores higher on, and an exact two-sided sign test on those
(McNemar's exact test when each answer is right or wrong). Questions both score alike carry no evidence.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from adaptive_mllm.prediction_writer import INCOMPLETE
from adaptive_mllm.reporting import format_table, print_table, refuse_existing_output, write_text_atomically
from adaptive_mllm.test_answers import ANSWERS_FILE, read_answers

Answers = dict[tuple[float, Any], dict[str, Any]]


def sign_test_p(wins: int, losses: int) -> float:
    """How likely a split at least this uneven is among the questions two runs score differently on, were
    neither better (exact two-sided sign test)."""
    differ = wins + losses
    if differ == 0:
        return 1.0
    tail = sum(math.comb(differ, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**differ)


def scores_at(answers: Answers, budget: float) -> dict[Any, float | None]:
    """Each question's score at ``budget``, by question id."""
    return {id_: row["score"] for (b, id_), row in answers.items() if b == budget}


def paired_counts(first: Answers, second: Answers, budget: float) -> tuple[int, int]:
    """Questions the first run scores higher / lower on than the second at ``budget``."""
    mine, theirs = scores_at(first, budget), scores_at(second, budget)
    if mine.keys() != theirs.keys():
        only = sorted(map(str, mine.keys() ^ theirs.keys()))[:3]
        raise ValueError(f"at budget {budget:g} the runs answered different questions ({len(mine)} vs {len(theirs)}; e.g. {only})")
    for id_ in mine:  # same ids, same questions? (a regenerated set reuses its ids for new scenes)
        row, other = first[(budget, id_)], second[(budget, id_)]
        for field in ("reference", "question_kind"):
            if row.get(field) != other.get(field):
                raise ValueError(
                    f"question {id_!r} at budget {budget:g}: {field} {row.get(field)!r} in A, {other.get(field)!r} in B; "
                    "the runs tested different questions under the same ids (another data seed or file?), or scored "
                    "them against other references (e.g. TextVQA's answers_by, or a version before it looked answers up "
                    "as LLaVA's eval_textvqa.py does)"
                )
    if any(score is None for score in [*mine.values(), *theirs.values()]):
        raise ValueError("the test's metric gives no per-question score (multiple choice, MME): no paired comparison")
    wins = sum(mine[id_] > theirs[id_] for id_ in mine)
    losses = sum(mine[id_] < theirs[id_] for id_ in mine)
    return wins, losses


def read_run(run: Path) -> Answers:
    """Every answer of one test (the files of all its processes). An empty file is an error (it says so),
    except one process's file beside others that hold answers: a process given only questions another
    process answers (padding) writes none."""
    files = sorted(run.glob("test_answers*.jsonl")) if run.is_dir() else [run]
    if not files or not all(path.is_file() for path in files):
        raise FileNotFoundError(f"{run}: no {ANSWERS_FILE} (`adaptive-mllm test` writes it beside test_results.md)")
    mark = files[0].parent / INCOMPLETE
    if mark.is_file():  # a stopped test: its answers are a part of the set, which paired with a whole run said only
        said = mark.read_text(encoding="utf-8", errors="replace").splitlines()[:1] or ["no reason given"]  # "different questions"
        raise ValueError(f"{mark}: the test that wrote these answers did not finish ({said[0]}): they are a part of its "
                         "questions; test that checkpoint again")  # fmt: skip
    if len(files) > 1:
        files = [path for path in files if path.stat().st_size > 0] or files[:1]
    answers: Answers = {}
    for path in files:
        answers.update(read_answers(path))
    return answers


def compare(first: Answers, second: Answers, alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per budget both runs answered: mean scores, the questions each scores higher on, p, and which run
    is better at ``alpha`` ("neither" where the split could be chance)."""
    budgets = sorted({b for b, _ in first} & {b for b, _ in second}, reverse=True)
    if not budgets:
        raise ValueError(f"the runs share no budget: {sorted({b for b, _ in first})} vs {sorted({b for b, _ in second})}")
    for name, answers in (("A", first), ("B", second)):
        alone = sorted({b for b, _ in answers} - set(budgets))
        if alone:
            print(f"compare: only {name} answered at budget(s) {', '.join(f'{b:g}' for b in alone)}: not compared")
    rows = []
    for budget in budgets:
        wins, losses = paired_counts(first, second, budget)
        scores = [list(scores_at(answers, budget).values()) for answers in (first, second)]
        p = sign_test_p(wins, losses)
        better = ("A" if wins > losses else "B") if p < alpha else "neither"
        rows.append({
            "budget": budget, "questions": len(scores[0]), "A": sum(scores[0]) / len(scores[0]), "B": sum(scores[1]) / len(scores[1]),
            "A higher": wins, "B higher": losses, "p": p, "better": better,
        })  # fmt: skip
    return rows


def main(argv: list[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="adaptive-mllm compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="a test's directory (or its test_answers.jsonl)")
    parser.add_argument("run_b", type=Path, help="another test of the same questions")
    parser.add_argument("--alpha", type=float, default=0.05, help="the p below which a difference is called one")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing --out file")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.out is not None:
        refuse_existing_output(parser, args.out, args.overwrite)
    rows = compare(read_run(args.run_a), read_run(args.run_b), args.alpha)
    header = ["budget", "questions", "A", "B", "A higher", "B higher", "p", "better"]
    table = [[f"{r['budget']:g}", str(r["questions"]), f"{100 * r['A']:.2f}%", f"{100 * r['B']:.2f}%", str(r["A higher"]),
              str(r["B higher"]), f"{r['p']:.2g}", r["better"]] for r in rows]  # fmt: skip
    print_table(f"A = {args.run_a}, B = {args.run_b} (better: p < {args.alpha:g})", header, table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, format_table(header, table) + "\n")  # a link there is replaced, not written through
    return rows
