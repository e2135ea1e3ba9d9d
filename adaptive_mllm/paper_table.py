"""`adaptive-mllm table`: the paper's table for one model: a row per budget, a column per benchmark
(the headline score in the paper's unit), the FLOPs fraction, and each score as a % of its full-budget
score.

Each benchmark is scored by the same `adaptive-mllm test` run a user would type (the recipe, the
checkpoint, the benchmark's data YAML, the budgets), each in a new directory of its own; the table is
then read back from the runs' test_results.csv. `--from_runs` skips the evaluation and only reads runs
already made. Markdown goes to the terminal, paper_table.md and paper_table.csv to the output folder; an
earlier table there is replaced only with --overwrite.

  adaptive-mllm table --config recipes/llava7b.yaml --ckpt_path runs/llava7b/checkpoints/last.ckpt \\
      --benchmarks recipes/benchmarks/*.yaml --out runs/llava7b-table
  adaptive-mllm table --from_runs runs/llava7b-table/*/ --out runs/llava7b-table --overwrite
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from adaptive_mllm.plots import read_results_csv
from adaptive_mllm.reporting import (
    format_table,
    refuse_existing_output,
    unwritable_reason,
    write_text_atomically,
)

PAPER_BUDGETS = [1.0, 0.85, 0.6]
HEADLINE = "overall"  # every benchmark metric's headline score, as test_results.csv names it
# benchmark datamodule -> its column, in the column order of the AdaLLaVA / LLaVA-1.5 tables
COLUMNS = {
    "VQAv2DataModule": "VQAv2",
    "GQADataModule": "GQA",
    "ScienceQADataModule": "SQA-I",
    "TextVQADataModule": "TextVQA",
    "POPEDataModule": "POPE",
    "MMEDataModule": "MME",
    "MMBenchDataModule": "MMB",
}
PAPER_COLUMNS = ["VQAv2", "SQA-I", "TextVQA", "POPE", "MME", "MMB"]  # always shown, "-" where not run
POINTS = {"MME"}  # headline in points (MME perception, max 2000); every other one is a fraction shown in %
MISSING = "-"
RESULTS = "test_results.csv"
TABLE_FILES = ("paper_table.md", "paper_table.csv")  # what a table writes into --out, beside its runs


@dataclass
class Run:
    """One benchmark's test run: its column in the table and its CSV rows keyed by budget."""

    column: str
    directory: Path
    rows: dict[float, dict[str, float]]


def column_of(data: dict | None, fallback: str) -> str:
    """The table column of a data config (``class_path``, full or short, and ``init_args``); ``fallback``
    for any other datamodule. ScienceQA over every test problem is "SQA", not the paper's IMG subset."""
    if not data:
        return fallback
    name = data["class_path"].rsplit(".", 1)[-1]
    if name == "ScienceQADataModule" and (data.get("init_args") or {}).get("images_only") is False:
        return "SQA"
    return COLUMNS.get(name, fallback)


def check_name(option: str, name: str, data: dict | None, source: str) -> None:
    """Refuse a NAME= that puts a benchmark's run under another benchmark's column (``POPE=`` over a GQA run):
    the table would print its score as the other benchmark's. A name of one's own (``POPE-adv``), or any name
    for a datamodule that fills no column (a user's own data), stays allowed."""
    own = column_of(data, "")
    benchmark_columns = {*COLUMNS.values(), "SQA"}
    if own and name in benchmark_columns and name != own:
        datamodule = data["class_path"].rsplit(".", 1)[-1]
        raise ValueError(
            f"{option}: {source} tested {datamodule}, which fills column {own!r}, not {name!r}; "
            f"name it {own}= (or a name of your own that is no benchmark's column)"
        )


def _split_label(spec: str) -> tuple[str | None, str]:
    """``"NAME=path"`` -> (NAME, path); a plain (or existing) path -> (None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name and "/" not in name:
            return name, path
    return None, spec


def _data_config(path: Path, run_config: bool) -> dict:
    """The data config of a benchmark YAML (``class_path`` and ``init_args`` at the top), or of a run's
    config.yaml (under ``data``)."""
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML ({error})") from None
    if run_config:
        config = config.get("data") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        where = "data.class_path" if run_config else "class_path"
        raise ValueError(f"{path}: field {where!r} missing; a benchmark YAML is `class_path: ...DataModule` plus `init_args`")
    return config


def _named_data_config(path: Path, run_config: bool) -> dict | None:
    """The data config where a NAME= gives the column: None where it names no datamodule (the name is taken
    as given, as before there was a check)."""
    try:
        return _data_config(path, run_config)
    except (OSError, ValueError):
        return None


def read_run(spec: str) -> Run:
    """A finished run from its directory (``NAME=dir`` names its column): the rows of its
    test_results.csv; the column from its config.yaml's datamodule, else the directory's name."""
    name, path = _split_label(spec)
    directory = Path(path)
    if directory.is_file():  # e.g. `--from_runs out/*` over a folder that holds a table already
        raise ValueError(f"--from_runs {spec}: a file, not a run directory (take the directories only: `out/*/`)")
    config = directory / "config.yaml"
    if name is None:
        name = column_of(_data_config(config, run_config=True) if config.is_file() else None, directory.name)
    elif config.is_file():
        check_name(f"--from_runs {spec}", name, _named_data_config(config, run_config=True), f"that run ({config})")
    results = directory / RESULTS
    rows = {}
    for index, row in enumerate(read_results_csv(results)):
        if HEADLINE not in row:
            raise ValueError(f"{results}: row {index + 1} (budget {row['budget']:g}): field {HEADLINE!r} missing")
        if row["budget"] in rows:
            raise ValueError(f"{results}: row {index + 1}: budget {row['budget']:g} appears twice")
        rows[row["budget"]] = row
    return Run(name, directory, rows)


def _ordered_columns(runs: Sequence[Run]) -> list[str]:
    """The paper's columns (and GQA when run) in its order, then any other benchmark as given."""
    given = [run.column for run in runs]
    known = [column for column in COLUMNS.values() if column in PAPER_COLUMNS or column in given]
    return known + [column for column in given if column not in known]


def _in_paper_unit(column: str, value: float) -> float:
    return value if column in POINTS else 100 * value


def table_rows(runs: Sequence[Run], budgets: Sequence[float] | None = None) -> tuple[list[str], list[dict[str, float | None]]]:
    """The table as numbers: the column names and one dict per budget (largest first) with ``budget``,
    ``flops_fraction`` (mean over the runs at that budget of their FLOPs against the plain full model, every image
    token in: the paper's TFLOPs over LLaVA's), each benchmark's headline in the paper's unit and
    ``<benchmark> % of full`` (its score over its score at budget 1.0); None where absent."""
    for run in runs:  # runs tested before the column existed: against the same token selection (exact without one)
        older = any("flops_fraction" in row and "flops_vs_plain" not in row for row in run.rows.values())
        if older and _selects_tokens(run.directory):
            warnings.warn(
                f"{run.directory}: test_results.csv has no flops_vs_plain column (a run of an earlier version); its "
                "FLOPs fraction is taken against the full model with the same token selection, not plain LLaVA",
                stacklevel=2,
            )
    seen: dict[str, Path] = {}
    for run in runs:
        if run.column in seen:
            raise ValueError(f"two runs for column {run.column!r}: {seen[run.column]} and {run.directory}; name one with NAME=path")
        seen[run.column] = run.directory
    columns = _ordered_columns(runs)
    by_column = {run.column: run for run in runs}
    if budgets is None:
        budgets = sorted({budget for run in runs for budget in run.rows}, reverse=True)
    rows = []
    for budget in budgets:
        row: dict[str, float | None] = {"budget": budget}
        fractions = [_flops_vs_plain(run.rows[budget]) for run in runs if "flops_fraction" in run.rows.get(budget, {})]
        row["flops_fraction"] = sum(fractions) / len(fractions) if fractions else None
        for column in columns:
            run = by_column.get(column)
            score = run.rows.get(budget, {}).get(HEADLINE) if run else None
            full = run.rows.get(1.0, {}).get(HEADLINE) if run else None
            row[column] = None if score is None else _in_paper_unit(column, score)
            row[f"{column} % of full"] = 100 * score / full if score is not None and full else None
        rows.append(row)
    return columns, rows


def _selects_tokens(directory: Path) -> bool:
    """Whether the run's config.yaml names a token selector (True where it cannot be told)."""
    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return True
    model = config.get("model") if isinstance(config, dict) else None
    return not isinstance(model, dict) or "token_selector" not in model or model["token_selector"] is not None


def _flops_vs_plain(row: dict[str, float]) -> float:
    return row.get("flops_vs_plain", row["flops_fraction"])


def _cell(value: float | None, decimals: int = 1) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def markdown(columns: Sequence[str], rows: Sequence[dict[str, float | None]]) -> str:
    """Two Markdown tables: the scores as the paper prints them (accuracy %, MME points), then each
    score as a % of the same benchmark's score at budget 1.0."""
    header = ["budget", "FLOPs %", *columns]
    scores = [
        [f"{100 * row['budget']:g}", _cell(None if row["flops_fraction"] is None else 100 * row["flops_fraction"]), *(_cell(row[c]) for c in columns)]
        for row in rows
    ]
    kept = [[f"{100 * row['budget']:g}", *(_cell(row[f"{c} % of full"]) for c in columns)] for row in rows]
    return (
        "Scores (accuracy %; MME: perception points)\n\n"
        + format_table(header, scores)
        + "\n\n% of full (score / score at budget 100)\n\n"
        + format_table(["budget", *columns], kept)
        + "\n"
    )


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, float | None]]) -> None:
    """The same numbers unrounded, empty where absent (written whole, never through a symlink)."""
    fields = ["budget", "flops_fraction", *columns, *(f"{c} % of full" for c in columns)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in fields})
    write_text_atomically(path, text.getvalue())


def plan_runs(benchmarks: Sequence[str], out: Path) -> list[tuple[str, Path, Path]]:
    """(column, data YAML, run directory) per benchmark, checked before anything runs: each YAML exists and
    names a datamodule, no two share a column, and no run directory already holds files (a table never
    writes over another run)."""
    planned: list[tuple[str, Path, Path]] = []
    for spec in benchmarks:
        name, path = _split_label(spec)
        data_yaml = Path(path)
        if not data_yaml.is_file():
            raise FileNotFoundError(f"{data_yaml}: no such benchmark YAML (e.g. recipes/benchmarks/pope.yaml)")
        if name is not None:
            check_name(f"--benchmarks {spec}", name, _named_data_config(data_yaml, run_config=False), str(data_yaml))
        column = name or column_of(_data_config(data_yaml, run_config=False), data_yaml.stem)
        twin = next((other for col, other, _ in planned if col == column), None)
        if twin is not None:
            raise ValueError(f"{twin} and {data_yaml} both fill column {column!r}; name one with NAME=path")
        run_dir = out / column
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir}: already holds a run; choose another --out (a table never writes over a run)")
        planned.append((column, data_yaml, run_dir))
    return planned


def run_test(args: list[str]) -> int:
    """``adaptive-mllm test`` with ``args`` in a process of its own: a strategy of several processes (the real
    recipes' 8-GPU DDP / FSDP) relaunches the command that started it, which must be this ``test``, not the
    table. Its messages go to this terminal; its exit code comes back."""
    from adaptive_mllm.recipe import RUN_DIRECTORY_VARIABLE  # imported here so --from_runs stays light

    environment = {name: value for name, value in os.environ.items() if name != RUN_DIRECTORY_VARIABLE}
    return subprocess.run([sys.executable, "-m", "adaptive_mllm.cli", *args], env=environment, check=False).returncode


def evaluate(
    config: str, ckpt_path: str | None, data_yaml: Path, budgets: Sequence[float], run_dir: Path, extra: Sequence[str],
    evaluated: Sequence[Path] = (),
) -> None:
    """One benchmark through `adaptive-mllm test` (the same command and flags a user would give), its files in
    ``run_dir`` only; ``evaluated``: the run directories of the benchmarks this table has evaluated before it
    (what a failure message points to)."""
    args = [
        "test",
        "--config", config,
        "--data", str(data_yaml),
        f"--model.eval_budgets=[{','.join(repr(float(b)) for b in budgets)}]",  # exact: the CSV rows match
        "--trainer.logger=false",
        f"--trainer.default_root_dir={run_dir}",
        *extra,
    ]  # fmt: skip
    if ckpt_path:
        args += ["--ckpt_path", ckpt_path]
    code = run_test(args)
    if code != 0:  # the table exits with the run's own code (2: a flag it refused, 143: stopped by SIGTERM, ...)
        if evaluated:
            advice = (
                f"The benchmarks evaluated before it ({', '.join(path.name for path in evaluated)}) are in {run_dir.parent}: "
                "after the fix, evaluate the others with another --out and build the table from both with --from_runs"
            )
        else:
            left = f" (or remove {run_dir}, which holds what it left)" if run_dir.is_dir() and any(run_dir.iterdir()) else ""
            advice = f"No benchmark was evaluated before it: after the fix, run the table again{left}"
        failed = f"was killed by signal {-code}" if code < 0 else f"failed (exit code {code}; its message is above)"
        print(f"adaptive-mllm table: the test run of {data_yaml} {failed}. {advice}", file=sys.stderr)
        raise SystemExit(128 - code if code < 0 else code)  # a signal as the shell reports it: SIGKILL 137
    if not (run_dir / RESULTS).is_file():
        raise RuntimeError(f"{run_dir / RESULTS}: the test run of {data_yaml} wrote no results there (did a flag set a logger with its own save_dir?)")


def check_writable_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` made (with its parents) and written to once, or a usage error naming it and the OS's reason."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; name a directory (it gets one directory per benchmark run and the table)")
    problem = unwritable_reason(out)
    if problem is not None:
        parser.error(f"--out {out}: {problem}")
    out.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="adaptive-mllm table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the model's recipe (evaluation mode)")
    parser.add_argument("--ckpt_path", help="the checkpoint to score (default: the recipe's weights as they are)")
    parser.add_argument("--benchmarks", nargs="+", default=[], help="benchmark data YAMLs (e.g. recipes/benchmarks/*.yaml); NAME=path names a column")
    parser.add_argument("--budgets", nargs="+", type=float, default=None,
                        help="the rows: by default the paper's with --config, every budget the runs have with --from_runs")
    parser.add_argument("--from_runs", nargs="+", default=[], help="read these runs' test_results.csv instead of evaluating; NAME=dir names a column")
    parser.add_argument("--out", default="runs/table", help="one directory per benchmark run, and paper_table.md / .csv")
    parser.add_argument("--overwrite", action="store_true", help="replace the paper_table.md / .csv of an earlier table in --out")
    args, extra = parser.parse_known_args(argv)
    if bool(args.from_runs) == bool(args.config):
        parser.error("give either --config (with --benchmarks) to evaluate, or --from_runs to read finished runs")
    if args.from_runs and (args.benchmarks or args.ckpt_path or extra):
        parser.error(f"--from_runs only reads runs; unexpected: {' '.join(['--benchmarks'] * bool(args.benchmarks) + ['--ckpt_path'] * bool(args.ckpt_path) + extra)}")
    if args.config and not args.benchmarks:
        parser.error("--benchmarks: at least one benchmark YAML to evaluate")
    if args.budgets is None and args.config:
        args.budgets = list(PAPER_BUDGETS)
    bad = [b for b in args.budgets or [] if not 0.0 < b <= 1.0]
    if bad:
        parser.error(f"--budgets must be in (0, 1], got {bad}")
    if args.budgets is not None and len(set(args.budgets)) != len(args.budgets):
        parser.error(f"--budgets: each budget once, got {args.budgets}")
    budget_flags = [flag for flag in extra if flag.split("=", 1)[0] in ("--model.eval_budgets", "--model.init_args.eval_budgets")]
    if budget_flags:  # the table's runs score exactly --budgets: another list would leave its rows empty
        parser.error(f"give the budgets with --budgets, not {budget_flags[0]}")
    out = Path(args.out)
    refuse_existing_output(parser, out, args.overwrite, TABLE_FILES)  # before any benchmark runs, not once they all have
    if args.config:
        check_writable_out(parser, out)  # before any benchmark runs, not once they all have
        # extra flags go to every test run (e.g. --trainer.devices=1 --trainer.precision=bf16-true)
        specs, done = [], []
        for column, data_yaml, run_dir in plan_runs(args.benchmarks, out):
            evaluate(args.config, args.ckpt_path, data_yaml, args.budgets, run_dir, extra, done)
            specs.append(f"{column}={run_dir}")
            done.append(run_dir)
        budgets: list[float] | None = args.budgets
    else:
        specs, budgets = args.from_runs, args.budgets  # None: every budget the runs have
    runs = [read_run(spec) for spec in specs]
    if args.from_runs and budgets is not None:  # a budget no run has would be an empty row
        have = {budget for run in runs for budget in run.rows}
        absent = [budget for budget in budgets if budget not in have]
        if absent:
            parser.error(f"--budgets {absent}: no run has them; the runs have {sorted(have, reverse=True)}")
    columns, rows = table_rows(runs, budgets)
    check_writable_out(parser, out)
    refuse_existing_output(parser, out, args.overwrite, TABLE_FILES)  # again: one may have been written while the benchmarks ran
    text = markdown(columns, rows)
    print(text)
    write_text_atomically(out / "paper_table.md", text)
    write_csv(out / "paper_table.csv", columns, rows)
    print(f"wrote {out / 'paper_table.md'} and {out / 'paper_table.csv'}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
