"""RunCheckpoint: the steps after the last ``every_n_train_steps`` save are kept, at the end of fit and when a
SIGTERM stops the run."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm.checkpoints import RunCheckpoint


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
