"""The recipe CLI keeps every run's files: evaluation writes into its own directory, fit refuses another
run's directory, checkpoints are checked before loading, and a missing test split never fails a fit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adaptive_mllm.checkpoints import CheckpointError, newest_last_checkpoint
from adaptive_mllm.cli import entry_point, main
from adaptive_mllm.recipe import FIT_LOCK

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
SMALL = [
    "--data.init_args.num_train=32",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=12",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
    "--data.init_args.num_workers=0",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def _run(args: list[str]) -> None:
    """One command, as its own process would run it: its W&B run ends with it (in one process, the next
    WandbLogger would append to a run still open)."""
    import wandb

    try:
        main(args)
    finally:
        wandb.finish()


def _files(directory: Path) -> dict[str, bytes]:
    """The run's files; W&B's links to its shared service log (``logs/debug-core.log``) are not the run's, nor the
    empty file a fit holds its folder with."""
    paths = sorted(path for path in directory.rglob("*") if path.is_file() and not path.is_symlink() and path.name != FIT_LOCK)
    return {str(path.relative_to(directory)): path.read_bytes() for path in paths}


def test_test_and_predict_on_a_fit_keep_its_files_and_write_their_own(in_tmp):
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    _run(fit)
    run = in_tmp / "runs" / "tiny"
    before = _files(run)
    assert "config.yaml" in before and "test_results.csv" in before and "checkpoints/last.ckpt" in before

    checkpoint = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    _run(["test", "--config", RECIPE, *SMALL, checkpoint, "--model.eval_budgets=[1.0,0.6]"])
    _run(["predict", "--config", RECIPE, *SMALL, checkpoint, "--model.budget=0.6"])

    after = _files(run)
    assert {name: after[name] for name in before} == before, "test / predict changed the fit's files"
    (tested,) = (run / "test").iterdir()
    assert {"config.yaml", "test_results.csv"} <= {path.name for path in tested.iterdir()}
    (predicted,) = (run / "predict").iterdir()
    rows = [json.loads(line) for line in (predicted / "budget-0.6.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({row["id"] for row in rows}) == 12
    assert all(row["budget"] == 0.6 and row["question"] and isinstance(row["answer"], str) for row in rows)
    assert all(0 < row["flops_fraction"] <= 0.6 + 1e-9 and row["units"] >= 0 for row in rows)

    # a second fit into the same directory, neither resuming nor told to replace it, is refused before it trains
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*--overwrite_run=true"):
        _run(fit)
    assert _files(run) == after

    # told to replace it, fit moves the earlier run aside: last.ckpt and config.yaml are the new run's
    _run([*fit, "--overwrite_run=true", "--trainer.max_steps=1"])
    (replaced,) = (run / "replaced").iterdir()
    assert (replaced / "checkpoints" / "last.ckpt").read_bytes() == before["checkpoints/last.ckpt"]
    assert (replaced / "config.yaml").read_bytes() == before["config.yaml"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert "max_steps: 1" in (run / "config.yaml").read_text() and not list(run.glob("config-resumed-*"))
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # no versioned copy beside an old last.ckpt
    # the evaluations of the old checkpoints and the old W&B run went with it: nothing of the old run is mixed in
    assert {"test", "predict", "wandb"} <= {path.name for path in replaced.iterdir()}
    assert not (run / "test").exists() and not (run / "predict").exists()
    old_runs = {path.name for path in (replaced / "wandb").glob("*run-*")}
    new_runs = {path.name for path in (run / "wandb").glob("*run-*")}
    assert old_runs and new_runs and not old_runs & new_runs


def test_evaluations_started_together_into_one_new_directory_each_get_their_own(tmp_path):
    """The empty directory is claimed by one of them; the other writes into <root>/<subcommand>/<time>."""
    from adaptive_mllm.recipe import _claim_if_empty

    root = tmp_path / "runs" / "eval"
    assert _claim_if_empty(root)  # new: taken
    assert not _claim_if_empty(root)  # still empty but for the claim: another run's
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert not _claim_if_empty(other)  # holds something: never taken


def test_a_run_that_failed_before_writing_gives_its_directory_back(in_tmp):
    """A refused flag leaves no claim behind: the corrected rerun writes where the first was meant to, and a failed
    run's own <subcommand>/<time> directory goes with it."""
    root = in_tmp / "runs" / "pb"
    with pytest.raises(ValueError, match="budget: budget 1.5 is outside"):
        main(["predict", "--config", RECIPE, *SMALL, f"--trainer.default_root_dir={root}", "--model.budget=1.5"])
    assert not any(root.iterdir())
    main(["predict", "--config", RECIPE, *SMALL, f"--trainer.default_root_dir={root}", "--model.budget=0.6"])
    assert (root / "budget-0.6.jsonl").is_file() and not (root / "predict").exists()
    with pytest.raises(ValueError, match="budget: budget 1.5 is outside"):
        main(["predict", "--config", RECIPE, *SMALL, f"--trainer.default_root_dir={root}", "--model.budget=1.5"])
    assert not any((root / "predict").iterdir())  # the failed run's predict/<time> is gone, the first run's files stay
    assert (root / "budget-0.6.jsonl").is_file()


def test_resuming_and_replacing_a_run_at_once_is_refused(in_tmp):
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--test_after_fit=false"]
    _run(fit)
    last = in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="--ckpt_path resumes a run, --overwrite_run=true replaces .* give one of them"):
        _run([*fit, f"--ckpt_path={last}", "--overwrite_run=true", "--trainer.max_steps=2"])
    assert not (in_tmp / "runs" / "tiny" / "replaced").exists()


def test_an_empty_checkpoint_is_named_before_lightning_reads_it(in_tmp):
    (in_tmp / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: the file is empty"):
        main(["test", "--config", RECIPE, *SMALL, "--ckpt_path=empty.ckpt"])


def test_the_command_prints_the_message_alone(in_tmp, monkeypatch, capsys):
    (in_tmp / "empty.ckpt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["adaptive-mllm", "test", "--config", RECIPE, *SMALL, "--ckpt_path=empty.ckpt"])
    monkeypatch.delenv("ADAPTIVE_MLLM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        entry_point()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "adaptive-mllm: error: CheckpointError: checkpoint empty.ckpt: the file is empty" in err
    assert "Traceback" not in err and "ADAPTIVE_MLLM_TRACEBACK=1" in err
    monkeypatch.setenv("ADAPTIVE_MLLM_TRACEBACK", "1")
    with pytest.raises(CheckpointError):
        entry_point()


def test_fit_without_a_test_split_finishes_and_says_why_it_did_not_test(in_tmp):
    with pytest.warns(UserWarning, match="has no test split"):
        main(["fit", "--config", RECIPE, *SMALL, "--data.init_args.num_test=0", "--trainer.max_steps=2",
              "--trainer.limit_val_batches=0"])
    run = in_tmp / "runs" / "tiny"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "test_results.csv").exists()


@pytest.mark.parametrize("budgets", ["[1.0,0.1]", "[0.0]"])
def test_eval_budgets_below_the_prefix_fail_when_the_recipe_is_parsed(budgets):
    from adaptive_mllm.recipe import build_cli

    # tiny.yaml: 1 always-run prefix layer of 8, so under the FLOPs rule no plan costs less than 1 / 8 of the full model
    with pytest.raises(ValueError, match=r"eval_budgets: budget 0\.[01] is below 0\.125, .* 1 always-run prefix layers? of 8"):
        build_cli(["--config", RECIPE, f"--model.eval_budgets={budgets}", "--model.scheduler.init_args.budget_rule=flops"], run=False)
    with pytest.warns(UserWarning, match=r"eval_budgets: budget 0\.[01] is below 0\.125, .* the release's rule runs it with "
                      r"0 scheduled layers, as budget 0\.125"):
        build_cli(["--config", RECIPE, f"--model.eval_budgets={budgets}"], run=False)


def test_a_checkpoint_of_another_scheduler_is_named(in_tmp):
    from adaptive_mllm.recipe import build_cli

    def built(recipe: str):
        cli = build_cli(["--config", str(Path(RECIPE).parent / recipe), *SMALL], run=False)
        cli.datamodule.prepare_data()  # the generated tokenizer the backbone reads
        cli.model.configure_model()
        return cli.model

    head = built("tiny-h.yaml")
    checkpoint = {"state_dict": head.state_dict()}
    head.on_save_checkpoint(checkpoint)  # records the scheduler it was trained with
    with pytest.raises(ValueError, match="the checkpoint holds a HeadScheduler .* the recipe builds a LayerScheduler"):
        built("tiny.yaml").on_load_checkpoint(checkpoint)


def test_one_flag_moves_a_whole_fit_and_a_placed_checkpoint_folder_stays(in_tmp):
    """--trainer.default_root_dir alone: config, W&B run and checkpoints all go there (the recipe names no other
    place), so a second run never writes into the first's checkpoints/; a dirpath given explicitly is kept."""
    _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
          "--trainer.default_root_dir=runs/second"])
    run = in_tmp / "runs" / "second"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    assert not (in_tmp / "runs" / "tiny").exists()
    # the run's own config.yaml (it records fit's ckpt_path: null) is a recipe for the tools too
    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--out_dir", "exported"])
    assert (in_tmp / "exported" / "model.safetensors").is_file()
    _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
          "--trainer.default_root_dir=runs/third", "--trainer.callbacks+=adaptive_mllm.checkpoints.RunCheckpoint",
          "--trainer.callbacks.dirpath=kept/here", "--trainer.callbacks.save_last=true"])
    assert (in_tmp / "kept" / "here" / "last.ckpt").is_file()  # the added one, where it was told
    assert (in_tmp / "runs" / "third" / "checkpoints" / "last.ckpt").is_file()  # the recipe's, in the run


def test_a_second_fit_into_a_root_whose_logger_versions_its_folder_is_refused_and_replaced_cleanly(in_tmp):
    """Lightning's default logger (CSVLogger here) keeps the config in a new lightning_logs/version_<n>/ per run, so
    the earlier run is found in the root, not in this run's own log folder; --overwrite_run moves the logs too."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
           "--test_after_fit=false", "--trainer.logger=true", "--trainer.default_root_dir=runs/csv"]
    run = in_tmp / "runs" / "csv"
    _run(fit)
    before = _files(run)
    assert "lightning_logs/version_0/config.yaml" in before and "checkpoints/last.ckpt" in before
    with pytest.raises(FileExistsError, match=r"runs/csv holds an earlier run \(.*version_0/config\.yaml\).*--overwrite_run=true"):
        _run(fit)
    assert _files(run) == before  # nothing written: no version_1, no last-v1.ckpt

    _run([*fit, "--overwrite_run=true", "--trainer.max_steps=1"])
    (replaced,) = (run / "replaced").iterdir()
    assert _files(replaced) == before
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert sorted(path.name for path in (run / "lightning_logs").iterdir()) == ["version_0"]  # starts again at 0
    assert "max_steps: 1" in (run / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


def test_a_checkpoint_of_another_run_is_not_continued_in_a_directory_holding_a_run(in_tmp):
    """It would mix the two runs (the top-level report x's, last.ckpt y's); into a new root it is a new run from
    the checkpoint's weights, and resuming the root's own run still works."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.limit_val_batches=0", "--test_after_fit=false"]
    _run([*fit, "--trainer.max_steps=1", "--trainer.default_root_dir=runs/x"])
    _run([*fit, "--trainer.max_steps=1", "--trainer.default_root_dir=runs/y"])
    other = in_tmp / "runs" / "x" / "checkpoints" / "last.ckpt"
    before = _files(in_tmp / "runs" / "y")
    with pytest.raises(FileExistsError, match=r"--ckpt_path .*runs/x/checkpoints/last\.ckpt is not a checkpoint of the run in "
                       r"runs/y .*its own --trainer\.default_root_dir with --ckpt_path"):
        _run([*fit, "--trainer.max_steps=2", "--trainer.default_root_dir=runs/y", f"--ckpt_path={other}"])
    assert _files(in_tmp / "runs" / "y") == before
    _run([*fit, "--trainer.max_steps=2", "--trainer.default_root_dir=runs/z", f"--ckpt_path={other}"])
    assert torch.load(in_tmp / "runs" / "z" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    own = in_tmp / "runs" / "y" / "checkpoints" / "last.ckpt"
    _run([*fit, "--trainer.max_steps=2", "--trainer.default_root_dir=runs/y", f"--ckpt_path={own}"])
    assert torch.load(own, weights_only=False)["global_step"] == 2


def _trainer(root: Path, loggers: list, dirpath: Path | None = None) -> SimpleNamespace:
    """What _earlier_run / set_aside_run read of a trainer."""
    return SimpleNamespace(default_root_dir=str(root), loggers=loggers,
                           checkpoint_callbacks=[SimpleNamespace(dirpath=str(dirpath) if dirpath else None)])


def test_versioned_log_folders_inside_the_root_hold_its_run_and_shared_ones_do_not(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from adaptive_mllm.recipe import _checkpoint_dirs, _earlier_run, _versioned_log_dirs, set_aside_run

    root = tmp_path / "run"
    (root / "logs" / "named" / "version_0").mkdir(parents=True)
    (root / "logs" / "named" / "version_0" / "config.yaml").write_text("earlier")
    inside = _trainer(root, [CSVLogger(save_dir=str(root / "logs"), name="named")])
    assert _earlier_run(inside) == root / "logs" / "named" / "version_0" / "config.yaml"
    # a save_dir outside the root, shared by several runs: its versions keep them apart, nothing to refuse
    (tmp_path / "shared" / "lightning_logs" / "version_0").mkdir(parents=True)
    (tmp_path / "shared" / "lightning_logs" / "version_0" / "config.yaml").write_text("another root's run")
    assert _earlier_run(_trainer(tmp_path / "fresh", [CSVLogger(save_dir=str(tmp_path / "shared"))])) is None
    # a checkpoint folder placed outside the root that already holds checkpoints: the new last.ckpt would land there
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "last.ckpt").write_bytes(b"x")
    assert _earlier_run(_trainer(tmp_path / "fresh", [], tmp_path / "kept")) == tmp_path / "kept" / "last.ckpt"

    keep = set_aside_run(root, _checkpoint_dirs(inside), _versioned_log_dirs(inside))
    assert (keep / "logs" / "named" / "version_0" / "config.yaml").read_text() == "earlier"
    assert _earlier_run(inside) is None


def test_the_claim_file_is_not_executable(tmp_path):
    from adaptive_mllm.recipe import CLAIM_FILE, _claim_if_empty

    umask = os.umask(0)
    try:
        assert _claim_if_empty(tmp_path / "root")
    finally:
        os.umask(umask)
    assert (tmp_path / "root" / CLAIM_FILE).stat().st_mode & 0o777 == 0o644


def test_checkpoints_on_another_filesystem_are_set_aside_too(tmp_path, monkeypatch):
    # a checkpoint folder on another filesystem than the run: rename fails there (EXDEV), and the earlier run's other
    # files were already moved when it did
    import errno
    import os

    from adaptive_mllm.recipe import set_aside_run

    root, elsewhere = tmp_path / "run", tmp_path / "scratch" / "checkpoints"
    root.mkdir()
    elsewhere.mkdir(parents=True)
    (root / "config.yaml").write_text("old run\n")
    (elsewhere / "last.ckpt").write_bytes(b"weights")
    rename = os.rename

    def across_filesystems(source, target, *args, **kwargs):
        if str(elsewhere) in str(source):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", across_filesystems)
    keep = set_aside_run(root, [elsewhere])
    assert (keep / "config.yaml").read_text() == "old run\n" and (keep / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    assert not list(elsewhere.iterdir())


def test_a_resumed_fit_with_other_flags_keeps_the_wandb_runs_first_config():
    # a W&B run continued by a resumed fit kept only the latest flags (its config replaced in place)
    from adaptive_mllm.recipe import wandb_config

    first = {"trainer": {"max_steps": 3}, "model": {"budget": 0.6}}
    assert wandb_config(first, "config.yaml") == first
    resumed = {"trainer": {"max_steps": 5}, "model": {"budget": 0.6}}
    assert wandb_config(resumed, "config-resumed-20261207-120000.yaml") == {"config-resumed-20261207-120000": resumed}


def test_a_damaged_checkpoint_is_named_where_lightning_reads_it(in_tmp):
    from tests.test_checkpoints import _damaged_checkpoint

    _damaged_checkpoint(in_tmp / "damaged.ckpt")
    for subcommand in ("test", "fit"):
        with pytest.raises(CheckpointError, match=r"checkpoint damaged\.ckpt: damaged \(data/\d+ unreadable"):
            main([subcommand, "--config", RECIPE, *SMALL, "--ckpt_path=damaged.ckpt", "--trainer.logger=false",
                  "--trainer.default_root_dir=runs/damaged"])


def test_a_checkpoint_folder_fit_cannot_write_is_refused_before_the_first_step(in_tmp, monkeypatch):
    """Lightning found it at the first save (500 steps in, with the recipes), every step lost."""
    import errno

    root = in_tmp / "runs" / "ro"
    (root / "checkpoints").mkdir(parents=True)
    real_open = os.open

    def read_only(path, *args, **kwargs):  # a read-only (or immutable) folder; root ignores chmod
        if Path(path).parent == root / "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patched:  # (not monkeypatch.undo(): that would leave in_tmp too)
        patched.setattr(os, "open", read_only)
        with pytest.raises(OSError, match=r"checkpoint folder .*runs/ro/checkpoints: cannot be written: Permission denied; "
                           r"fit would train until its first save"):
            _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.default_root_dir=runs/ro"])
    assert sorted(path.name for path in root.iterdir()) == [".adaptive-mllm-fit.lock", "checkpoints"]  # refused before
    # anything of the run was written (the lock file is the fit's hold on the folder, empty)
    assert not any((root / "checkpoints").iterdir())
    (in_tmp / "runs" / "file").write_text("")  # a folder that cannot be made: a file is in its place
    with pytest.raises(OSError, match=r"checkpoint folder .*runs/file/checkpoints: .*runs/file is not a directory"):
        _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.default_root_dir=runs/file/"])


def test_a_fit_that_failed_before_its_first_step_does_not_block_the_next(in_tmp, monkeypatch):
    """It wrote only its config (at setup); the corrected command runs there. A fit that took a step is a run: the
    next fit into its directory is refused as before."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.limit_val_batches=0", "--test_after_fit=false",
           "--trainer.default_root_dir=runs/retry"]  # fmt: skip
    root = in_tmp / "runs" / "retry"
    from adaptive_mllm.module import AdaptiveMLLM

    def refused(self):
        raise ValueError("a setting refused at the start of training")

    with monkeypatch.context() as patched:  # a check at the start of training, after setup wrote the config
        patched.setattr(AdaptiveMLLM, "on_train_start", refused, raising=False)
        with pytest.raises(ValueError, match="refused at the start of training"):
            _run([*fit, "--trainer.max_steps=1"])
    assert not (root / "config.yaml").exists()
    training_step = AdaptiveMLLM.training_step

    def failing_at_the_second_step(self, *args, **kwargs):
        if self.global_step == 1:
            raise RuntimeError("out of memory at step 2")
        return training_step(self, *args, **kwargs)

    with monkeypatch.context() as patched:  # (not monkeypatch.undo(): that would leave in_tmp too)
        patched.setattr(AdaptiveMLLM, "training_step", failing_at_the_second_step)
        with pytest.raises(RuntimeError, match="out of memory at step 2"):
            _run([*fit, "--trainer.max_steps=3"])  # runs: the failed one left nothing in its way
    assert (root / "config.yaml").is_file() and not list(root.glob("checkpoints/*.ckpt"))  # stepped once, saved nothing
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*config\.yaml"):
        _run([*fit, "--trainer.max_steps=1"])


def test_a_fit_without_a_logger_leaves_the_recipes_learning_rate_monitor_out(in_tmp):
    """Lightning stopped it at the start of training (``Cannot use LearningRateMonitor callback with Trainer that has
    no logger``), after the model was built, and no flag removes one entry of the recipe's callback list."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.limit_val_batches=0", "--test_after_fit=false", "--trainer.max_steps=1"]
    with pytest.warns(UserWarning, match=r"no logger \(trainer.logger is false\): the recipe's LearningRateMonitor is left out"):
        _run([*fit, "--trainer.logger=false"])
    assert torch.load(in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_ckpt_path_last_starts_a_new_run_then_resumes_it(in_tmp):
    """Lightning's set-and-forget `--ckpt_path last`: the same command first trains from scratch (no last*.ckpt
    yet), then resumes the run's newest last*.ckpt; validate / test / predict read it too."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.limit_val_batches=0", "--test_after_fit=false", "--ckpt_path=last"]
    _run([*fit, "--trainer.max_steps=1"])
    last = in_tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 1
    _run([*fit, "--trainer.max_steps=2"])  # an earlier run is there: only resuming it is allowed, and this does
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert (in_tmp / "runs" / "tiny" / "config.yaml").is_file()
    assert list((in_tmp / "runs" / "tiny").glob("config-resumed-*.yaml"))  # max_steps changed: kept apart

    _run(["test", "--config", RECIPE, *SMALL, "--ckpt_path=last", "--model.eval_budgets=[1.0]"])
    (tested,) = (in_tmp / "runs" / "tiny" / "test").iterdir()
    assert f"ckpt_path: {last.relative_to(in_tmp)}" in (tested / "config.yaml").read_text()


def test_ckpt_path_last_picks_the_newest_of_the_recipes_last_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "last.ckpt").write_bytes(b"x")
    (second / "epoch=0-step=9.ckpt").write_bytes(b"x")
    (second / "last-v1.ckpt").write_bytes(b"x")
    os.utime(first / "last.ckpt", (1, 1))
    assert newest_last_checkpoint([first, second, tmp_path / "missing"]) == second / "last-v1.ckpt"
    os.utime(second / "last-v1.ckpt", (0, 0))
    assert newest_last_checkpoint([first, second]) == first / "last.ckpt"
    assert newest_last_checkpoint([tmp_path / "missing"]) is None


def test_ckpt_path_last_without_a_checkpoint(in_tmp):
    """An evaluation has nothing to load (never the untrained weights, as Lightning would with a warning); a fit into
    a directory whose earlier run saved no checkpoint would mix with it: both named, nothing written."""
    with pytest.raises(CheckpointError, match=r"--ckpt_path last: no last\*\.ckpt in runs/tiny/checkpoints \(the recipe's"):
        _run(["test", "--config", RECIPE, *SMALL, "--ckpt_path=last"])
    (in_tmp / "runs" / "tiny").mkdir(parents=True)
    (in_tmp / "runs" / "tiny" / "config.yaml").write_text("seed_everything: 0\n")
    with pytest.raises(FileExistsError, match=r"--ckpt_path last: no last\*\.ckpt in runs/tiny/checkpoints, but runs/tiny "
                       r"holds an earlier run \(runs/tiny/config\.yaml\) that saved none: .*--overwrite_run=true"):
        _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--ckpt_path=last"])
    assert sorted(path.name for path in (in_tmp / "runs" / "tiny").iterdir()) == [".adaptive-mllm-fit.lock", "config.yaml"]


def test_a_second_fit_while_one_runs_in_the_root_is_refused(in_tmp):
    """Two fits started together both found the root empty and mixed their checkpoints (last.ckpt, last-v1.ckpt);
    the running one holds the root (a lock the operating system drops when its process ends)."""
    import subprocess

    from adaptive_mllm.data.directory_lock import DirectoryLock
    from adaptive_mllm.recipe import FIT_LOCK

    root = in_tmp / "runs" / "tiny"
    root.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(root / FIT_LOCK)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=r"runs/tiny: another fit is running in this directory"):
            _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1"])
        assert sorted(path.name for path in root.iterdir()) == [FIT_LOCK]  # nothing of the refused run's
    finally:
        holder.kill()
        holder.wait()
    _run(["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--test_after_fit=false"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    lock = DirectoryLock(root, FIT_LOCK)
    assert lock.try_exclusive()  # the finished fit let go of the root
    lock.release()


def test_a_run_set_aside_by_overwrite_run_is_not_resumed_over_the_current_one(in_tmp):
    """Its checkpoint lies under the root, but resuming it there replaced the current run's last.ckpt (and
    Lightning's top-k deleted the rest): refused, naming the folder it can be resumed in."""
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.limit_val_batches=0", "--test_after_fit=false"]
    _run([*fit, "--trainer.max_steps=1"])
    _run([*fit, "--trainer.max_steps=2", "--overwrite_run=true"])
    root = in_tmp / "runs" / "tiny"
    (aside,) = (root / "replaced").iterdir()
    before = _files(root / "checkpoints")
    with pytest.raises(FileExistsError, match=rf"is a checkpoint of the run --overwrite_run set aside in runs/tiny/replaced/"
                       rf"{aside.name}, .*--trainer\.default_root_dir runs/tiny/replaced/{aside.name}"):
        _run([*fit, "--trainer.max_steps=3", f"--ckpt_path={aside / 'checkpoints' / 'last.ckpt'}"])
    assert _files(root / "checkpoints") == before
    _run([*fit, "--trainer.max_steps=3", f"--trainer.default_root_dir={aside}", f"--ckpt_path={aside / 'checkpoints' / 'last.ckpt'}"])
    # Lightning saves a moved run's next last.ckpt as last-v1.ckpt (the recorded folder changed); --ckpt_path last reads it
    assert torch.load(newest_last_checkpoint([aside / "checkpoints"]), weights_only=False)["global_step"] == 3


def test_an_evaluation_never_takes_the_root_of_a_fit_that_has_not_written_yet(in_tmp):
    """A fit holds its root before it writes anything (building the model, generating data): a test started then
    found the root empty and wrote into the fit's run; it goes to <root>/test/<time> instead."""
    from adaptive_mllm.data.directory_lock import DirectoryLock
    from adaptive_mllm.recipe import _claim_if_empty

    root = in_tmp / "runs" / "tiny"
    root.mkdir(parents=True)
    fit = DirectoryLock(root, FIT_LOCK)
    assert fit.try_exclusive()
    try:
        assert not _claim_if_empty(root)
    finally:
        fit.release()
    assert _claim_if_empty(root)  # the fit's lock file alone, no fit running: the root is free


def test_a_logger_folder_fit_cannot_write_is_refused_before_it_starts(in_tmp, monkeypatch):
    """Before, W&B failed in setup with a bare NotADirectoryError naming no setting (or, on a read-only folder, kept
    its files in a temporary one); the checkpoint folder was checked, the logger's not."""
    import errno

    (in_tmp / "runs").mkdir()
    (in_tmp / "runs" / "file").write_text("")  # a folder that cannot be made: a file is in its place
    fit = ["fit", "--config", RECIPE, *SMALL, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    with pytest.raises(OSError, match=r"^ResilientWandbLogger's logger folder runs/file/wandb: .*runs/file is not a directory; "
                       r".*give a folder it can write \(--trainer\.logger\.init_args\.save_dir\)$"):
        _run([*fit, "--trainer.default_root_dir=runs/one", "--trainer.logger.init_args.save_dir=runs/file/wandb"])
    assert not (in_tmp / "runs" / "one" / "config.yaml").exists()  # refused before setup wrote anything of the run

    # one of several loggers, in a read-only (or immutable) folder; root ignores chmod
    csv = in_tmp / "runs" / "csv"
    csv.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).parent == csv:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    loggers = [{"class_path": "adaptive_mllm.tracking.ResilientWandbLogger", "init_args": {"offline": True}},
               {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(csv)}}]  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(os, "open", read_only)
        with pytest.raises(OSError, match=r"^CSVLogger's logger folder .*runs/csv: cannot be written: Permission denied; "
                           r".*\(the init_args\.save_dir of entry 1 of the recipe's trainer\.logger list\)$"):
            _run([*fit, "--trainer.default_root_dir=runs/two", f"--trainer.logger={json.dumps(loggers)}"])
    assert not any(csv.iterdir()) and not (in_tmp / "runs" / "two" / "config.yaml").exists()


def test_remote_checkpoint_and_logger_folders_are_left_to_lightning(tmp_path, monkeypatch):
    """``Path("s3://bucket/tb")`` is ``s3:/bucket/tb``, a local folder: checked as one, a remote logger was refused
    where the working directory cannot be written."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from adaptive_mllm import recipe

    trainer = SimpleNamespace(default_root_dir="s3://bucket/run", checkpoint_callbacks=[ModelCheckpoint(), ModelCheckpoint(dirpath=str(tmp_path))])
    assert recipe._checkpoint_dirs(trainer) == [tmp_path]
    asked = []
    monkeypatch.setattr(recipe, "unwritable_reason", lambda directory: asked.append(directory) or "cannot be written")
    recipe._check_writable("s3://bucket/tb", "TensorBoardLogger's logger folder", "lost", "fix")
    assert asked == []
    with pytest.raises(OSError, match=r"^TensorBoardLogger's logger folder /local/tb: cannot be written; lost: give a folder"):
        recipe._check_writable("/local/tb", "TensorBoardLogger's logger folder", "lost", "fix")
