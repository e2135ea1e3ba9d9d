"""Tracking trouble never stops training: W&B online without a key or a reachable host falls back to offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from adaptive_mllm.tracking import online_problem

RECIPE_DIR = Path(__file__).parents[1] / "recipes"


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """W&B set online, with no key anywhere W&B would look for one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_no_api_key_is_a_problem(no_wandb_login):
    assert "no W&B API key" in online_problem()


def test_unreachable_host_is_a_problem_found_quickly(no_wandb_login, monkeypatch):
    # a port bound but not listening, held for the whole check (no other process can start listening on it): the
    # connect is refused at once
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert "unreachable" in online_problem(timeout=1.0)


def test_reachable_host_with_key_is_fine(no_wandb_login, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert online_problem(timeout=1.0) is None


def test_offline_mode_is_never_a_problem(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert online_problem() is None


def test_fit_without_a_key_finishes_offline_with_a_warning(no_wandb_login):
    from adaptive_mllm.cli import main

    tmp = no_wandb_login
    logger = [
        "--trainer.logger=adaptive_mllm.tracking.ResilientWandbLogger",
        "--trainer.logger.offline=false",
        f"--trainer.logger.save_dir={tmp / 'runs'}",
    ]
    small = [
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=8",
        "--data.init_args.num_test=8",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
    ]
    with pytest.warns(UserWarning, match="no W&B API key.*offline"):
        main(["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), *logger, *small, "--trainer.max_steps=2",
              "--trainer.limit_val_batches=0", "--test_after_fit=false"])
    assert (tmp / "runs" / "tiny" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp / "runs" / "wandb").glob("offline-run-*")), "the run was not recorded offline"


def test_a_resumed_fit_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    import torch
    import wandb

    from adaptive_mllm.cli import main
    from adaptive_mllm.tracking import WANDB_RUN_KEY, recorded_wandb_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run an earlier test left open would be reused
    fit = ["fit", "--config", str(RECIPE_DIR / "tiny.yaml"), "--data.init_args.num_train=16", "--data.init_args.num_val=8",
           "--data.init_args.num_test=8", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
           "--trainer.limit_val_batches=0"]  # fmt: skip
    runs = tmp_path / "runs" / "tiny" / "wandb"
    try:
        main([*fit, "--trainer.max_steps=2"])
    finally:
        wandb.finish()
    (first,) = runs.glob("offline-run-*")
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    run_id = torch.load(checkpoint, weights_only=False)[WANDB_RUN_KEY]
    assert first.name.endswith(f"-{run_id}") and recorded_wandb_run(checkpoint) == run_id
    try:
        main([*fit, "--trainer.max_steps=4", f"--ckpt_path={checkpoint}"])
    finally:
        wandb.finish()
    second = sorted(set(runs.glob("offline-run-*")) - {first})
    assert len(second) == 1 and second[0].name.endswith(f"-{run_id}")  # the same run, continued
    assert recorded_wandb_run(tmp_path / "nowhere.ckpt") is None
    # continued from that checkpoint in a directory of its own: another run, whose W&B run is its own too
    try:
        main([*fit, "--trainer.max_steps=6", f"--ckpt_path={checkpoint}", "--trainer.default_root_dir=runs/branch"])
    finally:
        wandb.finish()
    (branch,) = (tmp_path / "runs" / "branch" / "wandb").glob("offline-run-*")
    assert not branch.name.endswith(f"-{run_id}")


def test_a_run_wandb_will_not_continue_becomes_a_new_one(tmp_path, monkeypatch):
    import wandb

    from adaptive_mllm.tracking import ResilientWandbLogger, continue_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()
    real_init = wandb.init

    def refusing(*args, **kwargs):
        if kwargs.get("resume"):
            raise RuntimeError("run ID abc12345 is in use")  # what W&B's service says for a run still open
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", refusing)
    logger = ResilientWandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    continue_wandb_run(logger, "abc12345")
    try:
        with pytest.warns(UserWarning, match="could not continue W&B run abc12345 .*in use.*starting a new run"):
            run = logger.experiment
        assert run.id != "abc12345"
    finally:
        wandb.finish()
