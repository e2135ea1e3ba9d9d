"""The `adaptive-mllm` command, in-process: recipes parse, parts swap by flag, a fit runs end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from adaptive_mllm.cli import build_cli, main

RECIPE_DIR = Path(__file__).parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run from tmp_path, so a recipe's relative paths (data/, runs/) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _small_data() -> list[str]:
    return [
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=24",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.num_workers=0",
    ]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"]["class_path"].endswith("Backbone")
    assert "class_path" in config["data"]
    callbacks = [callback["class_path"] for callback in config["trainer"]["callbacks"]]
    assert "adaptive_mllm.callbacks.SweepReport" in callbacks  # scores and the test report at every budget


def test_a_part_is_swapped_by_one_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(RECIPES[0]), "--model.scheduler=HeadScheduler", "--model.scheduler.rank=2", "--print_config"])
    scheduler = yaml.safe_load(capsys.readouterr().out)["model"]["scheduler"]
    assert scheduler["class_path"] == "adaptive_mllm.schedulers.HeadScheduler"
    assert scheduler["init_args"]["rank"] == 2


def test_one_size_flag_changes_one_size_and_keeps_the_rest():
    cli = build_cli(["--config", str(RECIPE_DIR / "tiny.yaml"), "--model.backbone.init_args.config.text.hidden_size=96"], run=False)
    backbone = cli.model.backbone
    text = backbone.llava_config.text_config
    assert text.hidden_size == 96 and isinstance(text.hidden_size, int)  # not the string "96"
    assert (text.num_hidden_layers, text.intermediate_size) == (8, 512)  # the recipe's other text sizes kept
    assert backbone.llava_config.vision_config.patch_size == 16


def test_unknown_size_key_is_named():
    from adaptive_mllm.backbones import LlavaBackbone

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['txt'\]"):
        LlavaBackbone(config={"txt": {}}, tokenizer="unused")


def test_prefix_as_deep_as_the_llm_fails_at_parse_time():
    with pytest.raises(ValueError, match=r"num_prefix_layers=8 must be in \[0, 7\]"):
        build_cli(["--config", str(RECIPE_DIR / "tiny.yaml"), "--model.scheduler.num_prefix_layers=8"], run=False)


def test_budget_outside_unit_range_fails_at_parse_time():
    with pytest.raises(ValueError, match=r"outside the admissible range \[0, 1\]"):
        build_cli(["--config", str(RECIPE_DIR / "tiny.yaml"), "--model.eval_budgets=[1.0,1.5]"], run=False)


@pytest.mark.parametrize("recipe", ["tiny.yaml", "tiny-h.yaml", "tiny-prumerge.yaml", "tiny-fastv.yaml"])
def test_fast_dev_run_fit(recipe, in_tmp):
    cli = build_cli(["fit", "--config", str(RECIPE_DIR / recipe), "--trainer.fast_dev_run=2", *_small_data()])
    assert (in_tmp / "data" / "shapes-vqa" / "train.json").is_file()
    trainer = cli.trainer
    assert trainer.global_step == 2  # two optimiser steps ran
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert 0.0 <= float(metrics["val/score/overall/budget_1"]) <= 1.0  # the recipe's SweepReport scored validation


def test_fit_writes_wandb_offline_run_checkpoint_and_test_table(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit = ["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), *_small_data(), "--trainer.limit_val_batches=1"]
    main([*fit, "--trainer.max_steps=3", "--trainer.val_check_interval=3"])
    runs = in_tmp / "runs" / "tiny"
    assert list((runs / "wandb").glob("offline-run-*")), "no W&B offline run directory"
    assert (runs / "checkpoints" / "last.ckpt").is_file()
    table = (runs / "test_results.md").read_text()
    assert "majority baseline" in table and "budget 0.3" in table and "overall" in table
    assert (runs / "budget_curves.png").is_file() and (runs / "layer_usage.png").is_file()
    assert (runs / "test_answers.jsonl").read_text().count("\n") == 24 * 5  # test_after_fit keeps its answers too

    # resuming continues from the checkpoint's step instead of starting over
    main([*fit, "--trainer.max_steps=5", "--trainer.val_check_interval=5", f"--ckpt_path={runs / 'checkpoints' / 'last.ckpt'}"])
    state = torch.load(runs / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 5
    # ... and its test report joins the first one's place, the first moved aside rather than overwritten
    earlier = list((runs / "earlier-tests").glob("*/test_answers.jsonl"))
    assert len(earlier) == 1 and (earlier[0].parent / "test_results.md").is_file() and (runs / "test_answers.jsonl").is_file()


def test_test_sweep_writes_table_csv_curves_and_heatmaps(in_tmp):
    budgets = "[1.0,0.9,0.75,0.6]"
    main(["test", "--config", str(RECIPE_DIR / "tiny-h.yaml"), *_small_data(), f"--model.eval_budgets={budgets}", "--trainer.logger=false"])
    runs = in_tmp / "runs" / "tiny-h"
    with open(runs / "test_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["budget"]) for row in rows] == [1.0, 0.9, 0.75, 0.6]
    fractions = [float(row["flops_fraction"]) for row in rows]
    # the release's rule: floor(32 b) - 4 head units of 28 (8 layers x 4, one always-run layer)
    assert [float(row["units"]) for row in rows] == [28, 24, 20, 15]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < fractions[0]
    assert {"overall", "units", "prefill_ms", "decode_ms_per_token"} <= set(rows[0])
    # no token selector: against the plain model is against the full model
    assert [float(row["flops_vs_plain"]) for row in rows] == pytest.approx(fractions)
    assert "FLOPs vs plain model" not in (runs / "test_results.md").read_text()
    for figure in ("budget_curves.png", "layer_usage.png", "group_usage.png"):
        assert (runs / figure).read_bytes()[:4] == b"\x89PNG", figure
    assert "decode ms / token" in (runs / "test_results.md").read_text()

    # every answer is kept: one line per question and budget, whose scores average to the table's
    lines = [json.loads(line) for line in (runs / "test_answers.jsonl").read_text().splitlines()]
    assert len(lines) == 24 * 4
    for row in rows:
        answered = [line for line in lines if line["budget"] == float(row["budget"])]
        assert len({line["id"] for line in answered}) == 24
        assert sum(line["score"] for line in answered) / 24 == pytest.approx(float(row["overall"]))
        assert sum(line["flops_fraction"] for line in answered) / 24 == pytest.approx(float(row["flops_fraction"]))
        assert all(line["reference"] and line["question_kind"] for line in answered)


class _BadRecords(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        from adaptive_mllm.data.llava_json import DataError

        raise DataError("data/test.json, record 7 (id 'q7'), field 'image': image file is truncated")


def test_an_error_in_a_dataloader_worker_prints_as_its_message_alone(monkeypatch, capsys):
    from adaptive_mllm import cli
    from adaptive_mllm.data.llava_json import DataError

    with pytest.raises(DataError) as raised:  # torch re-raises it with the worker's traceback as the message
        next(iter(torch.utils.data.DataLoader(_BadRecords(), num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert cli.message_of(raised.value) == "data/test.json, record 7 (id 'q7'), field 'image': image file is truncated"
    assert cli.message_of(ValueError("plain: message")) == "plain: message"

    def failing(args=None):
        raise raised.value

    monkeypatch.setattr(cli, "main", failing)
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    with pytest.raises(SystemExit):
        cli.entry_point()
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "adaptive-mllm: error: DataError: data/test.json, record 7 (id 'q7'), field 'image': image file is truncated"
    )
    assert "Traceback" not in err.splitlines()[0] and len(err.splitlines()) == 2


def test_a_run_stopped_by_sigterm_exits_with_its_signal_code(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from adaptive_mllm import cli

    def preempted(args=None):
        raise SIGTERMException()  # what Lightning raises between two steps after a SIGTERM

    monkeypatch.setattr(cli, "main", preempted)
    with pytest.raises(SystemExit) as exit_info:
        cli.entry_point()
    assert exit_info.value.code == 143  # 128 + 15: a scheduler or a `fit && export` chain sees it did not finish
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_a_sigterm_during_the_test_after_fit_says_training_is_saved(in_tmp, monkeypatch, capsys):
    """It said "resume it with --ckpt_path last", as for a fit stopped mid-training; training had finished."""
    import sys

    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from adaptive_mllm import cli

    def preempted(self, *args, **kwargs):
        raise SIGTERMException()  # what Lightning raises between two test batches after a SIGTERM

    monkeypatch.setattr(Trainer, "test", preempted)
    monkeypatch.setattr(sys, "argv", ["adaptive-mllm", "fit", "--config", str(RECIPE_DIR / "tiny.yaml"), *_small_data(),
                                      "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--test_after_fit=true"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning):
        cli.entry_point()
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert "during the test after training, which had finished and is saved" in err and "resume" not in err
    assert (in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt").is_file()


def test_help_names_every_subcommand(capsys):
    from adaptive_mllm.cli import SUBCOMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out.splitlines()[0] for name in SUBCOMMANDS) and "{fit,validate,test,predict}" in out


def test_a_token_selectors_test_reports_flops_against_the_plain_model(in_tmp):
    main(["test", "--config", str(RECIPE_DIR / "tiny-prumerge.yaml"), *_small_data(), "--model.eval_budgets=[1.0,0.6]",
          "--trainer.logger=false"])  # fmt: skip
    runs = in_tmp / "runs" / "tiny-prumerge"
    with open(runs / "test_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    full, reduced = rows
    assert float(full["flops_fraction"]) == pytest.approx(1.0)  # the full model with the same selection
    assert 0 < float(full["flops_vs_plain"]) < 1.0  # PruMerge+ kept fewer image tokens than the plain model runs
    assert float(reduced["flops_vs_plain"]) < float(full["flops_vs_plain"])
    assert "FLOPs vs plain model" in (runs / "test_results.md").read_text()


def test_a_resume_with_other_optimizer_groups_is_named(in_tmp):
    # weight decay splits biases and norms into groups of their own: torch only said the numbers of groups differ
    fit = ["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), *_small_data(), "--trainer.limit_val_batches=0",
           "--test_after_fit=false"]  # fmt: skip
    with pytest.warns(UserWarning, match="a fit of one optimizer step trains at learning rate 0"):
        main([*fit, "--trainer.max_steps=1"])
    last = in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"optimizer has 1 parameter groups \(rest\), this run's has 2 \(rest, rest/no_decay\)"):
        main([*fit, "--trainer.max_steps=2", "--model.weight_decay=0.1", f"--ckpt_path={last}"])
    main([*fit, "--trainer.max_steps=2", f"--ckpt_path={last}"])  # as it was trained: resumes
    assert torch.load(last, weights_only=False)["global_step"] == 2


def test_a_recipe_that_is_no_yaml_or_gives_an_unknown_key_is_named(tmp_path, capsys):
    """jsonargparse named no file (``in "<unicode string>"``) after about 60 lines of usage; `memory` read the file with
    yaml itself. A misspelled flag keeps jsonargparse's usage and exit code 2."""
    from adaptive_mllm.recipe_files import RecipeError

    recipe = (RECIPE_DIR / "tiny.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    for command in (["fit", "--config", str(broken)], ["memory", "--config", str(broken)], ["fit", f"--config={broken}"]):
        with pytest.raises(RecipeError, match=rf"^{broken}, line 2, column 1: not valid YAML \(while parsing a flow node; "):
            main(command)
    nested = tmp_path / "nested.yaml"
    nested.write_text(recipe.replace("    num_workers: 1", "    num_workrs: 1"))
    says = rf"^{nested}: data\.init_args\.num_workrs: not an argument of ShapesVQADataModule; did you mean 'num_workers'\?$"
    with pytest.raises(RecipeError, match=says):
        main(["fit", "--config", str(nested)])
    with pytest.raises(RecipeError, match=says):
        build_cli(["--config", str(nested)], run=False)  # the tools' parse (export, serve, ...)
    top = tmp_path / "top.yaml"
    top.write_text(recipe.replace("  learning_rate:", "  learning_rte:"))
    for parse in (lambda: main(["fit", "--config", str(top)]), lambda: build_cli(["--config", str(top)], run=False)):
        with pytest.raises(RecipeError, match=rf"^{top}: model\.learning_rte: not an option of the recipe"):
            parse()
    assert "usage:" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), "--data.init_args.num_workrs=1"])
    assert exit_.value.code == 2 and "num_workrs" in capsys.readouterr().err


def test_a_misspelled_key_is_named_in_its_own_file_given_relative_or_beside_another(tmp_path, monkeypatch):
    """jsonargparse parses a file from inside its folder (a relative path read again there is no file), and a key
    named like another file's nested key is that other file's only when it sits at that place."""
    from adaptive_mllm.recipe_files import RecipeError

    (tmp_path / "sub").mkdir()
    recipe = (RECIPE_DIR / "tiny.yaml").read_text().replace("num_prefix_layers:", "num_prefix_layer:")
    (tmp_path / "sub" / "r.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"sub/r\.yaml: model\.scheduler\.init_args\.num_prefix_layer: not an argument of LayerScheduler"):
        main(["fit", "--config", "sub/r.yaml"])
    override = tmp_path / "override.yaml"
    override.write_text("name: foo\n")  # tiny.yaml has a valid trainer.logger.init_args.name
    with pytest.raises(RecipeError, match=rf"^{override}: name: not an option of the recipe"):
        main(["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), "--config", str(override)])


def test_a_data_section_given_as_a_recipe_says_to_pass_it_as_data(tmp_path):
    """recipes/benchmarks/*.yaml stacked as a second --config (LightningCLI's habit) was reported as one of its keys not
    being an option of the recipe; `memory` named it as not an argument of "its class"."""
    from adaptive_mllm.recipe_files import RecipeError

    pope = RECIPE_DIR / "benchmarks" / "pope.yaml"
    says = rf"^{pope} is a data section \(a top-level class_path adaptive_mllm\.data\.benchmarks\.POPEDataModule\), not a recipe: pass it as --data {pope} "
    for command in (["test", "--config", str(RECIPE_DIR / "tiny.yaml"), "--config", str(pope)], ["memory", "--config", str(pope)]):
        with pytest.raises(RecipeError, match=says):
            main(command)
    short = tmp_path / "short.yaml"  # a short class name, as --data resolves it
    short.write_text("class_path: ShapesVQADataModule\ninit_args:\n  batch_size: 4\n")
    with pytest.raises(RecipeError, match=r"short\.yaml is a data section \(a top-level class_path ShapesVQADataModule\)"):
        build_cli(["--config", str(short)], run=False)


@pytest.mark.parametrize(("content", "says"), [
    ("", r"an empty recipe file \(no settings, at most comments\)"),
    ("# nothing yet\n", r"an empty recipe file"),
    ("- a\n- b\n", r"not a recipe: a YAML list where a mapping of recipe sections \(trainer:, model:, data:\) is expected"),
    ("tiny\n", r"not a recipe: a YAML str where a mapping"),
])  # fmt: skip
def test_a_recipe_file_that_is_empty_or_no_mapping_is_named(content, says, tmp_path):
    """jsonargparse said ``Unexpected config:`` (nothing more) for an empty one; `memory` failed on a list with
    ``AttributeError: 'list' object has no attribute 'get'``."""
    from adaptive_mllm.recipe_files import RecipeError

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    for command in (["fit", "--config", str(recipe)], ["memory", "--config", str(recipe)]):
        with pytest.raises(RecipeError, match=rf"^{recipe}: {says}"):
            main(command)
    with pytest.raises(RecipeError, match=rf"^--config {tmp_path}: a directory, not a recipe file"):  # IsADirectoryError
        main(["memory", "--config", str(tmp_path)])


@pytest.mark.parametrize(("word", "close"), [("sweep", "serve"), ("benchmrk", "benchmark"), ("xyzzy", None)])
def test_an_unknown_subcommand_lists_every_subcommand(word, close, capsys):
    """Lightning's parser listed only its four (``invalid choice: 'sweep' (choose from 'fit', 'validate', 'test',
    'predict')``), not benchmark, export, ask, ..."""
    with pytest.raises(SystemExit) as exit_:
        main([word, "--config", str(RECIPE_DIR / "tiny.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"unknown subcommand {word!r}" in err
    assert "fit validate test predict benchmark plot compare export ask serve profile table memory" in err
    assert (f"(did you mean {close!r}?)" in err) == (close is not None)
