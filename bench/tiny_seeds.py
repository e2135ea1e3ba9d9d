"""How reliable is a recipe? Train it under several seeds (and variants) in parallel processes, score the
Static and Random baselines with each trained model at the same budgets, and print one table.

One tiny run is one draw: on shapes-VQA, whether a model trained from scratch learns to find a shape by
its colour within the step budget varies with the seed. This script reports the spread, not one lucky run.

    python bench/tiny_seeds.py --config recipes/tiny.yaml --seeds 0 1 2 3 --jobs 2 --threads 1 \
        --variant base= --variant lr1e-3="--model.learning_rate=1e-3" --out runs/seeds

Each run gets its own directory (CSV logs, checkpoints, test_results.csv). The summary compares the learned plans with
both baselines at every budget against issue 16's bar (a lead of >= 2 points at some budget < 1, never behind,
>= 97% of the full-budget score kept at the lowest budget), and again question by question: an exact sign test
on the per-question answers (``adaptive-mllm compare``'s) gives the lead's p-value and the smallest p of any trail, and ``paired status``
forgives a trail a sign test cannot tell from chance (p >= 0.05); then gives the mean and [min, max] over seeds;
``--other_scenes_seed S`` scores every model again on a test split drawn with data seed S. The summary goes to
``<out>/summary.md`` and ``<out>/summary.csv``. Called again with the same ``--out``, it trains only the runs
that have not finished and scores only what is not scored yet (e.g. ``--other_scenes_seed`` added later); a run
directory trained with another recipe or other flags is refused. Extra flags after ``--`` reach every `adaptive-mllm`
call, e.g. ``-- --trainer.accelerator=gpu``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from adaptive_mllm.compare import paired_counts, sign_test_p
from adaptive_mllm.test_answers import ANSWERS_FILE, read_answers

BASELINES = ("StaticScheduler", "RandomScheduler")


def run_config(base: dict, run_dir: Path, seed: int) -> dict:
    """The recipe with this run's seed, directory and a CSV logger (W&B and progress bars off: many runs
    share one terminal and no network)."""
    config = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    config["seed_everything"] = seed
    config["model"]["backbone"].setdefault("init_args", {})["seed"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    trainer["enable_progress_bar"] = False
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    callbacks = []
    for callback in trainer.get("callbacks") or []:
        name = callback["class_path"].rsplit(".", 1)[-1]
        if "ProgressBar" in name:
            continue
        if name.endswith("Checkpoint"):
            callback = {**callback, "init_args": {**callback.get("init_args", {}), "dirpath": str(run_dir / "checkpoints")}}
        callbacks.append(callback)
    trainer["callbacks"] = callbacks
    return config


def read_results(path: Path) -> dict[float, dict[str, float]]:
    if not path.is_file():
        return {}
    with open(path) as handle:
        return {float(row["budget"]): {k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)}


class Runner:
    """Runs `adaptive-mllm` subprocesses with a thread budget each, none past a common deadline."""

    def __init__(self, extra: list[str], threads: int, deadline: float, other_scenes: Path | None = None, other_seed: int | None = None) -> None:
        self.extra, self.threads, self.deadline = extra, threads, deadline
        self.other_scenes, self.other_seed = other_scenes, other_seed

    def call(self, args: list[str], log: Path) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), "WANDB_MODE": "disabled"}
        command = [sys.executable, "-m", "adaptive_mllm.cli", *args, *self.extra]
        with open(log, "a") as handle:
            handle.write("$ " + shlex.join(command) + "\n")
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            try:
                code = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                handle.write("killed: past the deadline\n")
                code = -1
        return code == 0

    def train_and_score(self, name: str, config_path: Path, flags: list[str], run_dir: Path) -> None:
        """Train (unless a finished fit of this run is on disk), then score whatever is not scored yet: a rerun
        with the same ``--out`` resumes, or adds ``--other_scenes_seed`` to runs trained before."""
        log = run_dir / "run.log"
        if is_trained(run_dir):
            print(f"[{name}] trained before ({(run_dir / FIT_SECONDS).read_text().strip()} s): scoring what is missing", flush=True)
        else:
            started = time.monotonic()
            if not self.call(["fit", "--config", str(config_path), *flags], log):
                print(f"[{name}] fit failed or timed out: see {log}", flush=True)
                return
            (run_dir / FIT_SECONDS).write_text(f"{time.monotonic() - started:.1f}\n")
            print(f"[{name}] trained in {time.monotonic() - started:.0f} s", flush=True)
        self.score(name, config_path, flags, run_dir)

    def score(self, name: str, config_path: Path, flags: list[str], run_dir: Path) -> None:
        """Test the trained model and its baselines at every budget, each writing its answers per question (a
        fit whose own test wrote none, from a version before answers were kept, is tested again)."""
        log = run_dir / "run.log"
        checkpoint = ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
        # The baselines keep the trained prefix (a variant may change it) and insert the loaded latency token:
        # only the choice of layers differs from the trained model.
        prefix = resolved_prefix(run_dir)
        schedulers = {LEARNED: []}
        for baseline in BASELINES:
            schedulers[baseline] = [f"--model.scheduler=adaptive_mllm.schedulers.{baseline}", "--model.scheduler.insert_latency_token=true"]
            if prefix is not None:
                schedulers[baseline].append(f"--model.scheduler.num_prefix_layers={prefix}")
        scenes = {TRAIN_SCENES: []}
        if self.other_scenes is not None:
            scenes[f"scenes-{self.other_seed}"] = self.other_scenes_flags(run_dir)
        for scene, scene_flags in scenes.items():
            for scheduler, scheduler_flags in schedulers.items():
                out = results_dir(run_dir, scene, scheduler)
                if (out / ANSWERS_FILE).is_file() and (out / "test_results.csv").is_file():
                    continue  # scored by the fit's own test or an earlier call
                args = ["test", "--config", str(config_path), *flags, *scheduler_flags, *scene_flags, *checkpoint,
                        f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                        "--trainer.callbacks=[{class_path: adaptive_mllm.callbacks.SweepReport}]"]
                if not self.call(args, log):
                    print(f"[{name}] {scheduler} test on {scene} failed: see {log}", flush=True)

    def other_scenes_flags(self, run_dir: Path) -> list[str]:
        """A test split drawn with another data seed (no train / val split), read with the training set's
        tokenizer: its word ids follow word counts, so a tokenizer trained on other scenes could differ."""
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        tokenizer = resolved["model"]["backbone"]["init_args"]["tokenizer"]
        return [f"--data.init_args.data_dir={self.other_scenes}", f"--data.init_args.seed={self.other_seed}",
                "--data.init_args.num_train=0", "--data.init_args.num_val=0",
                f"--model.backbone.init_args.tokenizer={Path(tokenizer).resolve()}"]


LEARNED = "AdaLLaVA-L"
TRAIN_SCENES = "training seed"
FIT_SECONDS = "fit_seconds.txt"  # written once a fit has finished
RUN_FILE = "run.yaml"  # the recipe and flags a run directory was trained with


def is_trained(run_dir: Path) -> bool:
    return (run_dir / FIT_SECONDS).is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def claim_run_dir(run_dir: Path, recipe: dict, flags: str) -> None:
    """Record what this directory's run is; refuse to mix a trained run with another recipe or other flags,
    which a resumed call would otherwise score as if they were the same run."""
    run = yaml.safe_dump({"recipe": recipe, "flags": flags}, sort_keys=False)
    path = run_dir / RUN_FILE
    if is_trained(run_dir) and path.is_file() and path.read_text() != run:
        raise SystemExit(f"{run_dir} holds a run trained with another recipe or other flags ({path}): use another --out")
    path.write_text(run)


def results_dir(run_dir: Path, scenes: str, scheduler: str) -> Path:
    """Where the test of one scheduler on one set of scenes writes test_results.csv and its answers."""
    if scenes != TRAIN_SCENES:
        return run_dir / scenes / scheduler
    if scheduler != LEARNED:
        return run_dir / scheduler
    if (run_dir / ANSWERS_FILE).is_file() or not (run_dir / "test_results.csv").is_file():
        return run_dir  # the fit's own test
    return run_dir / LEARNED  # the fit's test kept no answers (an older version): tested again here


def resolved_prefix(run_dir: Path) -> int | None:
    """num_prefix_layers of the trained scheduler, read from the config the fit saved (variants may change it)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    scheduler = (yaml.safe_load(path.read_text())["model"].get("scheduler") or {}).get("init_args", {})
    return scheduler.get("num_prefix_layers")


def training_trace(run_dir: Path) -> dict:
    """The last logged training loss and full-budget validation score, so that an unfinished run still tells."""
    path, trace = run_dir / "metrics.csv", {}
    if not path.is_file():
        return trace
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss"):
                trace["train loss"] = float(row["train/loss"])
            if row.get("val/score/overall/budget_1"):
                trace["val@1"], trace["val step"] = 100 * float(row["val/score/overall/budget_1"]), int(row["step"])
    return trace


# Issue 16's bar: at some budget < 1 the learned plans lead both baselines by MARGIN points, they trail
# neither at any budget, and keep KEEP of their full-budget score at the lowest budget. The paired verdict
# reads "trail" as "trail by more than chance": a baseline ahead with a paired sign test's p < ALPHA.
MARGIN = 2.0
KEEP = 0.97
ALPHA = 0.05


def judge(row: dict, budgets: list[float]) -> str:
    """'pass', or the criteria a run misses; sets ``row["paired status"]`` too where ``row`` has paired p-values."""
    leads = leads_over_baselines(row, budgets)
    lead_at = lead_budget(leads)
    row["lead"] = float("nan") if lead_at is None else leads[lead_at]
    row["worst lead"] = min(leads.values())
    full = row[f"L@{budgets[0]:g}"]
    row["kept"] = row[f"L@{budgets[-1]:g}"] / full if full else float("nan")  # a run that learned nothing keeps nothing
    missed = []
    if not row["lead"] >= MARGIN:
        missed.append(f"leads by < {MARGIN:g} at every budget < 1")
    if not row["kept"] >= KEEP:  # nan (nothing learned) misses it too
        missed.append(f"keeps < {KEEP:.0%} at {budgets[-1]:g}")
    trails = ["trails a baseline"] if row["worst lead"] < -1e-6 else []
    if "trail p" in row:
        significant = [f"trails a baseline (p < {ALPHA:g})"] if row["trail p"] < ALPHA else []
        row["paired status"] = "; ".join(missed + significant) or "pass"
    return "; ".join(missed + trails) or "pass"


def leads_over_baselines(row: dict, budgets: list[float]) -> dict[float, float]:
    """Points by which the learned plans lead the better baseline, per budget."""
    return {b: row[f"L@{b:g}"] - max(row[f"{name}@{b:g}"] for name in SHORT) for b in budgets}


def lead_budget(leads: dict[float, float]) -> float | None:
    """The budget < 1 where the learned plans lead most."""
    return max((b for b in leads if b < 1), key=leads.__getitem__, default=None)


def add_paired(row: dict, answers: dict[str, dict], budgets: list[float]) -> None:
    """``lead p``: the sign test of the learned plans against the better baseline where they lead most;
    ``trail p``: the smallest p where a baseline scores higher (1 where none does)."""
    lead_at = lead_budget(leads_over_baselines(row, budgets))
    row["trail p"] = 1.0
    for budget in budgets:
        for short in SHORT:
            wins, losses = paired_counts(answers[LEARNED], answers[short], budget)
            p = sign_test_p(wins, losses)
            best = max(SHORT, key=lambda name: row[f"{name}@{budget:g}"])
            if budget == lead_at and short == best:
                row["lead p"] = p
            if losses > wins:
                row["trail p"] = min(row["trail p"], p)


SHORT = ("Static", "Random")


def summarise(out: Path, runs: list[tuple[str, int, Path]], other_scenes: list[str] = ()) -> list[dict]:
    """One row per run and set of scenes (L, Static and Random at every budget, the criteria), then the mean
    and spread [min, max] over seeds; written to summary.md / summary.csv."""
    rows = []
    for variant, seed, run_dir in runs:
        trace = training_trace(run_dir)
        seconds = run_dir / FIT_SECONDS
        fit_s = float(seconds.read_text()) if seconds.is_file() else float("nan")
        for scenes in [TRAIN_SCENES, *other_scenes]:
            row: dict = {"variant": variant, "scenes": scenes, "seed": seed, **trace}
            own = read_results(results_dir(run_dir, scenes, LEARNED) / "test_results.csv")
            baselines = {short: read_results(results_dir(run_dir, scenes, name) / "test_results.csv") for short, name in zip(SHORT, BASELINES, strict=True)}
            budgets = sorted(own, reverse=True)
            if not budgets or any(set(scores) != set(own) for scores in baselines.values()):
                rows.append({**row, "status": "no test result"})
                continue
            for budget in budgets:
                row[f"L@{budget:g}"] = 100 * own[budget]["overall"]
                for short, scores in baselines.items():
                    row[f"{short}@{budget:g}"] = 100 * scores[budget]["overall"]
            paths = {LEARNED: results_dir(run_dir, scenes, LEARNED), **{s: results_dir(run_dir, scenes, n) for s, n in zip(SHORT, BASELINES, strict=True)}}
            if all((path / ANSWERS_FILE).is_file() for path in paths.values()):
                add_paired(row, {name: read_answers(path / ANSWERS_FILE) for name, path in paths.items()}, budgets)
            row["status"] = judge(row, budgets)
            row["fit s"] = fit_s
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |")
    lines += ["", *spread_table(rows, columns)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines), flush=True)
    return rows


def _cell(value: object, column: str = "") -> str:
    if isinstance(value, float) and column.endswith(" p"):  # a p-value: two significant digits
        return f"{value:.2g}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 2 and value != 0 else f"{value:.1f}"
    return "" if value is None else str(value)


def spread_table(rows: list[dict], columns: list[str]) -> list[str]:
    """Per variant and scenes: the mean and [min, max] over seeds of every number, and how many seeds pass."""
    numbers = [c for c in columns if c not in ("variant", "scenes", "seed", "status", "paired status", "val step")]
    lines = ["| variant | scenes | seeds | pass | " + " | ".join(numbers) + " |", "|" + "---|" * (len(numbers) + 4)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("status") != "no test result":
            groups.setdefault((row["variant"], row["scenes"]), []).append(row)
    for (variant, scenes), group in groups.items():
        cells = []
        for column in numbers:
            values = [row[column] for row in group if isinstance(row.get(column), float)]
            if not values:
                cells.append("")
                continue
            spread = f"[{_cell(min(values), column)}, {_cell(max(values), column)}]"
            if column.endswith(" p"):  # a mean of p-values means nothing
                cells.append(spread)
                continue
            cells.append(f"{_cell(sum(values) / len(values))} {spread}")
        passed = f"{sum(row['status'] == 'pass' for row in group)}/{len(group)}"
        if any("paired status" in row for row in group):
            passed += f" (paired: {sum(row.get('paired status') == 'pass' for row in group)})"
        lines.append(f"| {variant} | {scenes} | {len(group)} | {passed} | " + " | ".join(cells) + " |")
    return lines


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict[str, str], dict]:
    """The variants (name -> flags) and the recipe, or a usage error for what would fail later as a traceback
    (or, for a repeated seed or variant, train one run directory twice at once)."""
    for flag in ("jobs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.deadline_s > 0:  # nan too
        parser.error(f"--deadline_s must be > 0, got {args.deadline_s}")
    repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if repeated:
        parser.error(f"--seeds: each seed once (one run directory per seed and variant), got {repeated[0]} twice")
    names = [v.split("=", 1)[0] for v in args.variant]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        parser.error(f"--variant: each name once (one run directory per seed and variant), got {twice[0]!r} twice")
    config = Path(args.config)
    if not config.is_file():
        parser.error(f"--config {config}: no such file")
    try:
        base = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"--config {config}: not a readable YAML recipe ({error})")
    if not isinstance(base, dict) or not isinstance(base.get("model"), dict) or not isinstance(base["model"].get("backbone"), dict):
        parser.error(f"--config {config}: not a recipe (expected a mapping with model.backbone)")
    variants = dict(v.split("=", 1) if "=" in v else (v, "") for v in args.variant) or {"recipe": ""}
    return variants, base


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        index = argv.index("--")
        argv, extra = argv[:index], argv[index + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a named set of `adaptive-mllm` flags (repeatable); default: the recipe as is")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--deadline_s", type=float, default=float("inf"), help="stop whatever still runs after this long")
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--other_scenes_seed", type=int, default=None,
                        help="also test every model (and the baselines) on a test split drawn with this data seed")
    args = parser.parse_args(argv)
    variants, base = check_arguments(parser, args)
    out = Path(args.out)
    other_scenes = None if args.other_scenes_seed is None else (out / f"scenes-{args.other_scenes_seed}").resolve()
    runner = Runner(extra, args.threads, time.monotonic() + args.deadline_s, other_scenes, args.other_scenes_seed)
    runs, futures = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for seed in args.seeds:
            for variant, flags in variants.items():
                run_dir = (out / f"{variant}-s{seed}").resolve()
                run_dir.mkdir(parents=True, exist_ok=True)
                config = run_config(base, run_dir, seed)
                claim_run_dir(run_dir, config, flags)
                config_path = run_dir / "recipe.yaml"
                config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                runs.append((variant, seed, run_dir))

                futures.append(pool.submit(runner.train_and_score, f"{variant}-s{seed}", config_path, shlex.split(flags), run_dir))
        for future in futures:
            future.result()
    return summarise(out, runs, [] if other_scenes is None else [f"scenes-{args.other_scenes_seed}"])


if __name__ == "__main__":
    main()
