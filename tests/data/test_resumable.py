"""Resumption of training: a resumed fit sees the batches the uninterrupted one saw, mid-epoch or from an epoch's end,
and draws the same random numbers (budgets, Gumbel noise)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from adaptive_mllm.cli import main
from adaptive_mllm.data.resumable import ResumableDataLoader, ResumableSampler

TINY_RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"


# --- the sampler ---------------------------------------------------------------------------------------
def test_first_epoch_is_the_order_of_a_shuffling_dataloader_and_uses_the_global_generator_alike():
    data = list(range(50))
    torch.manual_seed(3)
    expected = list(DataLoader(data, batch_size=4, shuffle=True))
    after_expected = torch.rand(1)
    torch.manual_seed(3)
    sampler = ResumableSampler(data)
    assert isinstance(sampler, RandomSampler) and isinstance(sampler, DistributedSampler)
    got = list(DataLoader(data, batch_size=4, sampler=sampler))
    assert [b.tolist() for b in got] == [b.tolist() for b in expected]
    assert torch.equal(torch.rand(1), after_expected)  # the global generator advanced as much as before


@pytest.mark.parametrize("drop_last", [False, True])
def test_several_processes_get_distributed_samplers_order(drop_last):
    data = list(range(23))
    for epoch in range(3):
        for rank in range(3):
            reference = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=7, drop_last=drop_last)
            reference.set_epoch(epoch)
            sampler = ResumableSampler(data, num_replicas=3, rank=rank, seed=7, drop_last=drop_last)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(reference) and len(sampler) == len(reference)
    with pytest.raises(ValueError, match="needs a seed"):
        ResumableSampler(data, num_replicas=2, rank=0)


# --- the loader's state ------------------------------------------------------------------------------------
def round_trip(state: dict) -> dict:
    """Through a checkpoint file, as Lightning loads it (weights only)."""
    buffer = io.BytesIO()
    torch.save({"state": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["state"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_resumes_after_the_consumed_batches(num_workers):
    data = list(range(37))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=5, sampler=ResumableSampler(data), num_workers=num_workers)

    torch.manual_seed(0)
    first = loader()
    epochs = []
    for epoch in range(2):
        first.sampler.set_epoch(epoch)
        epochs.append([batch.tolist() for batch in first])

    torch.manual_seed(0)
    interrupted = loader()
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(3)]  # workers have prefetched further: only 3 were consumed
    state = round_trip(interrupted.state_dict())
    assert state["batches_consumed"] == 3 and seen == epochs[0][:3]

    torch.manual_seed(123)  # another process: the global generator does not matter any more
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(epochs[0])  # still the whole epoch's length (Lightning counts on it)
    assert [batch.tolist() for batch in resumed] == epochs[0][3:]
    assert resumed.state_dict()["batches_consumed"] == len(epochs[0])
    end_of_epoch = round_trip(resumed.state_dict())
    resumed.sampler.set_epoch(1)
    assert [batch.tolist() for batch in resumed] == epochs[1]  # the next iteration starts afresh

    at_the_end = loader()  # saved when the epoch was over: the next epoch starts
    at_the_end.load_state_dict(end_of_epoch)
    assert at_the_end.sampler.epoch == 1 and [batch.tolist() for batch in at_the_end] == epochs[1]


def test_a_loader_whose_sampler_was_replaced_has_no_state():
    data = list(range(8))
    plain = ResumableDataLoader(data, batch_size=2)
    assert plain.state_dict() == {}
    with pytest.warns(UserWarning, match="not a ResumableSampler"):
        plain.load_state_dict({"sampler": {}, "batches_consumed": 1, "batch_size": 2})


# --- a real fit, interrupted and resumed -------------------------------------------------------------------
class Interrupted(Exception):
    pass


class IdLog(L.Callback):
    """Appends each training batch's step, sample ids and global random state (a digest) to ``path``; raises
    Interrupted at ``stop_at``, or stops the run as a SIGTERM would after step ``sigterm_at``."""

    def __init__(self, path: str, stop_at: int = -1, sigterm_at: int = -1) -> None:
        self.path = path
        self.stop_at = stop_at
        self.sigterm_at = sigterm_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            raise Interrupted(f"stopped at step {self.stop_at}")
        random = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "ids": batch["ids"], "random": random}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.sigterm_at:
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets


def fit(
    directory: Path, log: Path, max_steps: int, num_workers: int, stop_at: int = -1, ckpt_path: Path | None = None,
    sigterm_at: int = -1, every: int = 5, extra: tuple[str, ...] = (),
) -> None:
    callback = {"class_path": f"{__name__}.IdLog", "init_args": {"path": str(log), "stop_at": stop_at, "sigterm_at": sigterm_at}}
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI parses args alone (and warns about pytest's)
        _main_fit(directory, log, max_steps, num_workers, ckpt_path, callback, every, extra)


def _main_fit(directory, log, max_steps, num_workers, ckpt_path, callback, every, extra=()) -> None:
    main([
        "fit", "--config", str(TINY_RECIPE),
        "--data.init_args.num_train=64", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
        "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=8", f"--data.init_args.num_workers={num_workers}",
        f"--data.init_args.data_dir={directory / 'data'}", f"--model.backbone.init_args.tokenizer={directory / 'data' / 'tokenizer'}",
        f"--trainer.max_steps={max_steps}", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--model.full_budget_steps=0",  # a budget drawn per example from the first step: random numbers to continue
        "--trainer.callbacks+=adaptive_mllm.checkpoints.RunCheckpoint",  # the recipes' (also saves when fit ends)
        f"--trainer.callbacks.dirpath={directory / 'checkpoints'}", "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks.every_n_train_steps={every}",
        f"--trainer.callbacks+={json.dumps(callback)}",
        f"--trainer.default_root_dir={directory / 'runs'}", "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0", "--test_after_fit=false",
        *([f"--ckpt_path={ckpt_path}"] if ckpt_path else []), *extra,
    ])


def steps(log: Path) -> dict[int, tuple[list[str], str]]:
    """step -> (its sample ids, the random state it started from)"""
    return {row["step"]: (row["ids"], row["random"]) for row in map(json.loads, log.read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, list[str]]]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    fit(directory, directory / "ids.jsonl", max_steps=12, num_workers=0)
    return directory / "data", steps(directory / "ids.jsonl")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_fit_resumed_mid_epoch_sees_the_batches_of_the_uninterrupted_one(uninterrupted, num_workers, tmp_path, monkeypatch):
    data, expected = uninterrupted
    assert len(expected) == 12 and len({i for s in range(8) for i in expected[s][0]}) == 64  # 8 batches an epoch
    assert len({expected[s][1] for s in expected}) == 12  # each step draws: its random state is its own
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data)  # the generated set and its tokenizer, shared
    log = tmp_path / "ids.jsonl"
    with pytest.raises(Interrupted):
        fit(tmp_path, log, max_steps=12, num_workers=num_workers, stop_at=8)  # the last checkpoint: step 5
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 5
    [loader_state] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["batches_consumed"] == 5 and loader_state["sampler"]["epoch"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, log, max_steps=12, num_workers=num_workers, ckpt_path=last)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    seen = steps(log)  # steps 5-7 were seen twice: before the interruption and after the resume
    assert seen == expected  # the resumed steps 5-11 (through the epoch's end into the next): same batches, same draws


def test_a_fit_resumed_from_a_save_that_a_validation_followed_continues_the_uninterrupted_one(uninterrupted, tmp_path, monkeypatch):
    """A validation after the step a checkpoint saved drew from torch's generator (its loader's seed), so the
    uninterrupted run trained on after it with other random numbers than a run resumed from that checkpoint (which
    does not validate there again): budgets and Gumbel noise differed from step 6 on."""
    data, _ = uninterrupted
    monkeypatch.chdir(tmp_path)
    validating = ("--trainer.val_check_interval=5", "--trainer.limit_val_batches=1")  # after steps 5 and 10
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run in (whole, parts):
        run.mkdir()
        (run / "data").symlink_to(data)  # the generated set and its tokenizer, shared
    fit(whole, whole / "ids.jsonl", max_steps=12, num_workers=0, extra=validating)
    expected = steps(whole / "ids.jsonl")
    assert len({expected[s][1] for s in expected}) == 12
    with pytest.raises(Interrupted):
        fit(parts, parts / "ids.jsonl", max_steps=12, num_workers=0, stop_at=8, extra=validating)
    last = parts / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 5  # saved just before the validation after step 5
    fit(parts, parts / "ids.jsonl", max_steps=12, num_workers=0, ckpt_path=last, extra=validating)
    assert steps(parts / "ids.jsonl") == expected


@pytest.mark.parametrize(
    ("first", "saved_at"),
    [({"max_steps": 8}, 8), ({"max_steps": 10}, 10), ({"max_steps": 12, "sigterm_at": 8}, 8)],
    ids=["stopped-at-the-epochs-end", "stopped-part-way-by-max-steps", "sigterm-at-the-epochs-end"],
)
def test_a_fit_resumed_from_its_end_of_fit_save_continues_the_uninterrupted_one(uninterrupted, first, saved_at, tmp_path, monkeypatch):
    """The save RunCheckpoint makes when fit ends (or a SIGTERM stops it) after Lightning marked the epoch done:
    restored as Lightning saved it, the next epoch ran one batch (an epoch's order skipped, the rest shifted), or an
    epoch stopped part-way was never finished."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    data, expected = uninterrupted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data)
    log = tmp_path / "ids.jsonl"
    try:
        fit(tmp_path, log, num_workers=0, every=100, **first)  # no save but the one at the end
    except SIGTERMException:
        assert "sigterm_at" in first
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == saved_at
    fit(tmp_path, log, max_steps=12, num_workers=0, ckpt_path=last, every=100)
    assert steps(log) == expected
