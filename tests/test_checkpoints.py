"""RunCheckpoint: the steps after the last ``every_n_train_steps`` save are kept, at the end of fit and when a
SIGTERM stops the run; a checkpoint file is written beside its target and renamed over it."""

from __future__ import annotations

import os
import signal
import tempfile

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm.checkpoints import ReplacingCheckpointIO, RunCheckpoint, check_checkpoint


def _fit(tmp_path, checkpoint: ModelCheckpoint, model: L.LightningModule, max_steps: int = 7) -> None:
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model)


def _saved_step(path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def test_fit_ending_between_saves_keeps_its_last_steps(tmp_path):
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True, every_n_train_steps=5)
    _fit(tmp_path, plain, BoringModel())
    assert _saved_step(tmp_path / "plain" / "last.ckpt") == 5  # what Lightning's own callback keeps: 2 steps lost
    ours = RunCheckpoint(dirpath=tmp_path / "ours", save_last=True, every_n_train_steps=5)
    _fit(tmp_path, ours, BoringModel())
    assert _saved_step(tmp_path / "ours" / "last.ckpt") == 7
    assert sorted(path.name for path in (tmp_path / "ours").iterdir()) == ["epoch=1-step=7.ckpt", "last.ckpt"]  # the top-k copy replaced, not added


class TerminatedAtStep3(BoringModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:  # the third step: a scheduler preempts the job
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


def test_a_sigterm_saves_the_steps_done(tmp_path):
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=100)
    with pytest.raises(SIGTERMException):
        _fit(tmp_path, checkpoint, TerminatedAtStep3(), max_steps=50)
    assert _saved_step(tmp_path / "ckpt" / "last.ckpt") == 3  # stopped after the step it was in


class InterruptedAtStep3(BoringModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:  # Ctrl+C
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_ctrl_c_says_which_steps_were_not_kept(tmp_path):
    """Ctrl+C can land inside an optimizer step, so nothing is saved then; the user is told what is lost and how
    to stop a run keeping it."""
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    with pytest.warns(UserWarning, match=r"interrupted at step 3: the steps after the last save .*last\.ckpt.* SIGTERM"):
        with pytest.raises(SystemExit):
            _fit(tmp_path, checkpoint, InterruptedAtStep3(), max_steps=50)
    assert _saved_step(tmp_path / "ckpt" / "last.ckpt") == 2


def test_checkpoints_are_written_beside_their_target_and_renamed_over_it(tmp_path, monkeypatch):
    """Never staged in the system temp dir (Lightning's own IO fails here: the temp dir is gone, as a full /tmp
    fails it), and the target is only ever replaced whole, by a rename from its own directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    replaced = []
    real_replace = os.replace

    def recording(source, target):
        replaced.append((os.path.dirname(source), os.path.dirname(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert isinstance(trainer.strategy.checkpoint_io, ReplacingCheckpointIO)
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["epoch=1-step=3.ckpt", "last.ckpt"]  # no temporary
    assert _saved_step(check_checkpoint(tmp_path / "ckpt" / "last.ckpt")) == 3
    assert replaced and all(source == target == str(tmp_path / "ckpt") for source, target in replaced)
    assert not (tmp_path / "no-such-tmp").exists()


def test_a_save_that_fails_part_way_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "ckpt" / "last.ckpt"
    io = ReplacingCheckpointIO()
    io.save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()

    def dying(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")  # what a save had written when it failed (disk full, a kill)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2}, target)
    assert target.read_bytes() == before
    assert [path.name for path in target.parent.iterdir()] == ["last.ckpt"]
    assert not any((tmp_path / "tmp").iterdir())


def test_a_checkpoint_io_the_user_chose_is_kept(tmp_path):
    class Mine(TorchCheckpointIO):
        pass

    mine = Mine()
    checkpoint = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=1, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", plugins=[mine],
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.strategy.checkpoint_io is mine and (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_a_remote_checkpoint_is_left_to_lightning(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.chdir(tmp_path)
    ReplacingCheckpointIO().save_checkpoint({"global_step": 1}, "memory://run/ckpt/last.ckpt")
    assert fsspec.filesystem("memory").isfile("/run/ckpt/last.ckpt") and not any(tmp_path.iterdir())
