"""bench/tiny_seeds.py: each run gets its own directory and logger, and the summary reads the criteria right."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from bench.tiny_seeds import run_config, summarise

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"


def test_run_config_isolates_each_run(tmp_path: Path) -> None:
    base = yaml.safe_load(RECIPE.read_text())
    config = run_config(base, tmp_path / "run-s3", seed=3)
    assert config["seed_everything"] == 3 and config["model"]["backbone"]["init_args"]["seed"] == 3
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path / "run-s3")
    assert trainer["logger"]["class_path"].endswith("CSVLogger")
    names = [callback["class_path"].rsplit(".", 1)[-1] for callback in trainer["callbacks"]]
    assert "RichProgressBar" not in names and "ModelCheckpoint" in names
    checkpoint = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "run-s3" / "checkpoints")
    assert base["trainer"]["default_root_dir"] == "runs/tiny"  # the recipe itself is left alone


def _write_results(path: Path, overall: dict[float, float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "test_results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["budget", "overall"])
        writer.writeheader()
        writer.writerows({"budget": b, "overall": v} for b, v in overall.items())


def test_summary_applies_the_criteria(tmp_path: Path) -> None:
    good, drops, missing = tmp_path / "good", tmp_path / "drops", tmp_path / "missing"
    _write_results(good, {1.0: 0.96, 0.6: 0.95})
    _write_results(good / "StaticScheduler", {1.0: 0.96, 0.6: 0.94})
    _write_results(good / "RandomScheduler", {1.0: 0.96, 0.6: 0.90})
    _write_results(drops, {1.0: 0.90, 0.6: 0.80})
    _write_results(drops / "StaticScheduler", {1.0: 0.90, 0.6: 0.85})
    missing.mkdir()
    rows = summarise(tmp_path, [("a", 0, good), ("a", 1, drops), ("a", 2, missing)])
    assert rows[0]["L@0.6"] == 95.0 and rows[0]["Static@0.6"] == 94.0 and rows[0]["Random@0.6"] == 90.0
    assert rows[0]["status"] == "ok at 0.6, beats baselines, >= 85% at 1"
    assert rows[1]["status"] == "drops at 0.6, does not beat baselines, >= 85% at 1"
    assert rows[2]["status"] == "no test result"
    assert (tmp_path / "summary.md").read_text().count("\n") == 5  # header, rule, three rows
