"""How reliable is a recipe? Train it under several seeds (and variants) in parallel processes, score the
Static and Random baselines with each trained model at the same budgets, and print one table.

One tiny run is one draw: on shapes-VQA, whether a model trained from scratch learns to find a shape by
its colour within the step budget varies with the seed. This script reports the spread, not one lucky run.

    python bench/tiny_seeds.py --config recipes/tiny.yaml --seeds 0 1 2 3 --jobs 2 --threads 1 \
        --variant base= --variant lr1e-3="--model.learning_rate=1e-3" --out runs/seeds

Each run gets its own directory (CSV logs, checkpoints, test_results.csv); the summary goes to
``<out>/summary.md`` and ``<out>/summary.csv``. Extra flags after ``--`` reach every `adaptive-mllm`
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
        if name == "ModelCheckpoint":
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

    def __init__(self, extra: list[str], threads: int, deadline: float) -> None:
        self.extra, self.threads, self.deadline = extra, threads, deadline

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
        log = run_dir / "run.log"
        started = time.monotonic()
        if not self.call(["fit", "--config", str(config_path), *flags], log):
            print(f"[{name}] fit failed or timed out: see {log}", flush=True)
            return
        (run_dir / "fit_seconds.txt").write_text(f"{time.monotonic() - started:.1f}\n")
        print(f"[{name}] trained in {time.monotonic() - started:.0f} s", flush=True)
        prefix = resolved_prefix(run_dir)  # the baselines keep the trained prefix, which a variant may change
        for baseline in BASELINES:
            scheduler = [f"--model.scheduler=adaptive_mllm.schedulers.{baseline}", "--model.scheduler.insert_latency_token=true"]
            if prefix is not None:
                scheduler.append(f"--model.scheduler.num_prefix_layers={prefix}")
            out = run_dir / baseline
            args = ["test", "--config", str(config_path), *flags, *scheduler, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                    f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                    "--trainer.callbacks=[{class_path: adaptive_mllm.callbacks.SweepReport}]"]
            if not self.call(args, log):
                print(f"[{name}] {baseline} test failed: see {log}", flush=True)


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


def summarise(out: Path, runs: list[tuple[str, int, Path]]) -> list[dict]:
    rows = []
    for variant, seed, run_dir in runs:
        own = read_results(run_dir / "test_results.csv")
        row: dict = {"variant": variant, "seed": seed, **training_trace(run_dir)}
        if not own:
            rows.append({**row, "status": "no test result"})
            continue
        budgets = sorted(own, reverse=True)
        low = budgets[-1]
        for budget in budgets:
            row[f"L@{budget:g}"] = 100 * own[budget]["overall"]
        for baseline in BASELINES:
            scores = read_results(run_dir / baseline / "test_results.csv")
            if low in scores:
                row[f"{baseline.removesuffix('Scheduler')}@{low:g}"] = 100 * scores[low]["overall"]
        full, at_low = own[budgets[0]]["overall"], own[low]["overall"]
        beats = all(row.get(f"{b.removesuffix('Scheduler')}@{low:g}", 101) < 100 * at_low for b in BASELINES)
        seconds = run_dir / "fit_seconds.txt"
        row["fit s"] = float(seconds.read_text()) if seconds.is_file() else float("nan")
        row["status"] = (
            f"{'ok' if at_low >= 0.95 * full else 'drops'} at {low:g}, "
            f"{'beats' if beats else 'does not beat'} baselines, {'>=' if full >= 0.85 else '<'} 85% at {budgets[0]:g}"
        )
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines), flush=True)
    return rows


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
    args = parser.parse_args(argv)

    variants = dict(v.split("=", 1) if "=" in v else (v, "") for v in args.variant) or {"recipe": ""}
    base = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    runner = Runner(extra, args.threads, time.monotonic() + args.deadline_s)
    runs, futures = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for seed in args.seeds:
            for variant, flags in variants.items():
                run_dir = (out / f"{variant}-s{seed}").resolve()
                run_dir.mkdir(parents=True, exist_ok=True)
                config_path = run_dir / "recipe.yaml"
                config_path.write_text(yaml.safe_dump(run_config(base, run_dir, seed), sort_keys=False))
                runs.append((variant, seed, run_dir))

                futures.append(pool.submit(runner.train_and_score, f"{variant}-s{seed}", config_path, shlex.split(flags), run_dir))
        for future in futures:
            future.result()
    return summarise(out, runs)


if __name__ == "__main__":
    main()
