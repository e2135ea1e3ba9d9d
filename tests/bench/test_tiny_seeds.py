"""bench/tiny_seeds.py: each run gets its own directory and logger, and the summary reads the criteria right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from adaptive_mllm.compare import sign_test_p
from adaptive_mllm.test_answers import ANSWERS_FILE
from bench.tiny_seeds import Runner, claim_run_dir, is_trained, run_config, summarise

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"


def test_run_config_isolates_each_run(tmp_path: Path) -> None:
    base = yaml.safe_load(RECIPE.read_text())
    config = run_config(base, tmp_path / "run-s3", seed=3)
    assert config["seed_everything"] == 3 and config["model"]["backbone"]["init_args"]["seed"] == 3
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path / "run-s3")
    assert trainer["logger"]["class_path"].endswith("CSVLogger")
    names = [callback["class_path"].rsplit(".", 1)[-1] for callback in trainer["callbacks"]]
    assert "RichProgressBar" not in names and "RunCheckpoint" in names
    checkpoint = next(c for c in trainer["callbacks"] if c["class_path"].endswith("RunCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "run-s3" / "checkpoints")
    assert base["trainer"]["default_root_dir"] == "runs/tiny"  # the recipe itself is left alone


def _write_results(path: Path, overall: dict[float, float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "test_results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["budget", "overall"])
        writer.writeheader()
        writer.writerows({"budget": b, "overall": v} for b, v in overall.items())


def _write_answers(path: Path, scores: dict[float, list[int]]) -> None:
    """A test's answers file: question i's score at each budget."""
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"q{i}", "budget": b, "score": score}) for b, row in scores.items() for i, score in enumerate(row)]
    (path / ANSWERS_FILE).write_text("\n".join(lines) + "\n")


def _write_run(run_dir: Path, learned: dict[float, float], static: dict[float, float], random: dict[float, float]) -> None:
    _write_results(run_dir, learned)
    (run_dir / ANSWERS_FILE).write_text("")  # the fit's own test, of a version that keeps answers
    _write_results(run_dir / "StaticScheduler", static)
    _write_results(run_dir / "RandomScheduler", random)


def test_summary_applies_the_criteria(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("good", "close", "trails", "drops", "missing")}
    _write_run(runs["good"], {1.0: 0.96, 0.6: 0.95}, {1.0: 0.96, 0.6: 0.92}, {1.0: 0.96, 0.6: 0.90})
    _write_run(runs["close"], {1.0: 0.96, 0.8: 0.96, 0.6: 0.95}, {1.0: 0.96, 0.8: 0.95, 0.6: 0.94}, {1.0: 0.96, 0.8: 0.9, 0.6: 0.90})
    _write_run(runs["trails"], {1.0: 0.96, 0.8: 0.96, 0.6: 0.95}, {1.0: 0.96, 0.8: 0.97, 0.6: 0.90}, {1.0: 0.96, 0.8: 0.9, 0.6: 0.90})
    _write_run(runs["drops"], {1.0: 0.90, 0.6: 0.80}, {1.0: 0.90, 0.6: 0.70}, {1.0: 0.90, 0.6: 0.70})
    runs["missing"].mkdir()
    rows = summarise(tmp_path, [("a", seed, run_dir) for seed, run_dir in enumerate(runs.values())])
    good, close, trails, drops, missing = rows
    assert good["L@0.6"] == 95.0 and good["Static@0.6"] == 92.0 and good["Random@0.6"] == 90.0
    assert good["lead"] == 3.0 and good["status"] == "pass"
    assert close["lead"] == 1.0 and close["status"] == "leads by < 2 at every budget < 1"
    assert trails["lead"] == 5.0 and trails["worst lead"] == -1.0 and trails["status"] == "trails a baseline"
    assert drops["status"] == "keeps < 97% at 0.6"
    assert missing["status"] == "no test result"
    summary = (tmp_path / "summary.md").read_text()
    assert summary.split("\n\n")[0].count("\n") == 6  # header, rule, five rows
    spread = summary.split("\n\n")[1].splitlines()
    # the two-budget and three-budget runs share the L@1 column: mean of 96, 96, 96, 90 over four seeds
    assert spread[2].startswith("| a | training seed | 4 | 1/4 | ")
    assert "94.5 [90.0, 96.0]" in spread[2]


def test_other_scenes_are_read_from_their_own_directories(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_run(run_dir, {1.0: 0.96, 0.6: 0.95}, {1.0: 0.96, 0.6: 0.92}, {1.0: 0.96, 0.6: 0.90})
    _write_results(run_dir / "scenes-7" / "AdaLLaVA-L", {1.0: 0.9, 0.6: 0.9})
    _write_results(run_dir / "scenes-7" / "StaticScheduler", {1.0: 0.9, 0.6: 0.91})
    _write_results(run_dir / "scenes-7" / "RandomScheduler", {1.0: 0.9, 0.6: 0.80})
    rows = summarise(tmp_path, [("a", 0, run_dir)], ["scenes-7"])
    assert [row["scenes"] for row in rows] == ["training seed", "scenes-7"]
    assert rows[0]["status"] == "pass"
    assert rows[1]["Static@0.6"] == 91.0 and rows[1]["status"] == "leads by < 2 at every budget < 1; trails a baseline"


def _finished_fit(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "fit_seconds.txt").write_text("12.5\n")


def test_a_rerun_scores_only_what_is_missing(tmp_path: Path) -> None:
    run_dir = tmp_path / "recipe-s0"
    _finished_fit(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"scheduler": {"init_args": {"num_prefix_layers": 1}}}}))
    _write_results(run_dir, {1.0: 0.9})  # the fit's own test, from a version that kept no answers
    _write_results(run_dir / "StaticScheduler", {1.0: 0.9})  # scored by an earlier call
    _write_answers(run_dir / "StaticScheduler", {1.0: [1, 0]})
    calls: list[list[str]] = []

    class Recording(Runner):
        def call(self, args: list[str], log: Path) -> bool:
            calls.append(args)
            return True

    Recording([], threads=1, deadline=float("inf")).train_and_score("recipe-s0", run_dir / "recipe.yaml", [], run_dir)
    assert [args[0] for args in calls] == ["test", "test"]  # no second fit; the model without answers, the missing baseline
    assert not any(arg.startswith("--model.scheduler") for arg in calls[0])  # the trained model itself
    assert f"--trainer.default_root_dir={run_dir / 'AdaLLaVA-L'}" in calls[0]  # beside, not over, the fit's files
    assert "--model.scheduler=adaptive_mllm.schedulers.RandomScheduler" in calls[1]
    assert "--model.scheduler.num_prefix_layers=1" in calls[1]


def test_an_unfinished_run_is_trained_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "recipe-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # stopped before the fit finished
    assert not is_trained(run_dir)
    _finished_fit(tmp_path / "done")
    assert is_trained(tmp_path / "done")


def test_a_trained_run_dir_refuses_another_recipe(tmp_path: Path) -> None:
    run_dir = tmp_path / "recipe-s0"
    recipe = yaml.safe_load(RECIPE.read_text())
    claim_run_dir(tmp_path, recipe, "")  # an untrained directory may be claimed again with anything
    claim_run_dir(tmp_path, recipe, "--model.learning_rate=1e-3")
    _finished_fit(run_dir)
    claim_run_dir(run_dir, recipe, "--model.learning_rate=3e-4")
    claim_run_dir(run_dir, recipe, "--model.learning_rate=3e-4")  # the same run: resumed
    with pytest.raises(SystemExit, match="another recipe or other flags"):
        claim_run_dir(run_dir, recipe, "")
    changed = {**recipe, "seed_everything": 5}
    with pytest.raises(SystemExit, match=str(run_dir)):
        claim_run_dir(run_dir, changed, "--model.learning_rate=3e-4")


def test_paired_verdict_forgives_a_trail_within_chance(tmp_path: Path) -> None:
    """Two runs that both trail Static by points at 0.7: by 2 of 200 questions (chance) and by 12 (not)."""
    budgets = (1.0, 0.7, 0.4)
    right = [1] * 200
    for name, behind in (("noise", 2), ("real", 12)):
        run_dir = tmp_path / name
        learned = {1.0: right, 0.7: [0] * behind + [1] * (200 - behind), 0.4: [0] * 4 + [1] * 196}
        static = {1.0: right, 0.7: right, 0.4: [1] * 4 + [0] * 24 + [1] * 172}  # L leads at 0.4 by 20 questions
        random = {b: [0] * 100 + [1] * 100 for b in budgets}
        for sub, scores in (("", learned), ("StaticScheduler", static), ("RandomScheduler", random)):
            _write_results(run_dir / sub, {b: sum(row) / 200 for b, row in scores.items()})
            _write_answers(run_dir / sub, scores)
    noise, real = summarise(tmp_path, [("a", 0, tmp_path / "noise"), ("a", 1, tmp_path / "real")])
    assert noise["lead"] == pytest.approx(10.0) and real["lead"] == pytest.approx(10.0)
    # at 0.4: 24 questions only L gets right, 4 only Static does
    assert noise["lead p"] == pytest.approx(sign_test_p(24, 4)) and noise["lead p"] < 0.05
    assert noise["status"] == real["status"] == "trails a baseline"  # the strict bar: any trail
    assert noise["trail p"] == pytest.approx(sign_test_p(0, 2)) and noise["paired status"] == "pass"
    assert real["trail p"] < 0.05 and real["paired status"] == "trails a baseline (p < 0.05)"
    spread = (tmp_path / "summary.md").read_text().split("\n\n")[1].splitlines()[2]
    assert "| 2 | 0/2 (paired: 1) |" in spread


def test_a_run_that_learned_nothing_is_judged_not_crashed(tmp_path: Path) -> None:
    _write_run(tmp_path / "zero", {1.0: 0.0, 0.6: 0.0}, {1.0: 0.0, 0.6: 0.0}, {1.0: 0.0, 0.6: 0.0})
    (row,) = summarise(tmp_path, [("a", 0, tmp_path / "zero")])
    assert "keeps < 97% at 0.6" in row["status"]  # 0 of 0 kept: nothing, not a division by zero


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),  # was concurrent.futures' traceback
        (["--threads", "-1"], "--threads must be >= 1, got -1"),
        (["--deadline_s", "nan"], "--deadline_s must be > 0, got nan"),
        (["--seeds", "0", "1", "0"], "--seeds: each seed once (one run directory per seed and variant), got 0 twice"),
        (["--variant", "base=", "--variant", "base=--model.learning_rate=1e-3"], "--variant: each name once (one run directory per seed and variant), got 'base' twice"),
        (["--config", "nope.yaml"], "--config nope.yaml: no such file"),  # was FileNotFoundError's traceback
    ],
)
def test_bad_arguments_are_usage_errors_before_anything_runs(tmp_path: Path, monkeypatch, capsys, flags: list[str], says: str) -> None:
    from bench.tiny_seeds import main

    def no_training(*args: object) -> None:
        raise AssertionError("a run was started")

    monkeypatch.setattr(Runner, "train_and_score", no_training)  # without the checks, this fails fast, not trains
    monkeypatch.chdir(tmp_path)  # a relative --config is looked for here
    out = tmp_path / "seeds"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(RECIPE), "--seeds", "0", "--out", str(out), *flags])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_config_that_is_no_recipe_is_a_usage_error(tmp_path: Path, capsys) -> None:
    from bench.tiny_seeds import main

    for text, says in (("model: [\n", "not a readable YAML recipe"), ("- a list\n", "not a recipe (expected a mapping with model.backbone)")):
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        with pytest.raises(SystemExit):
            main(["--config", str(config), "--seeds", "0", "--out", str(tmp_path / "seeds")])
        assert f"--config {config}: {says}" in capsys.readouterr().err
    assert not (tmp_path / "seeds").exists()
