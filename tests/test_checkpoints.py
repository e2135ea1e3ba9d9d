"""RunCheckpoint: the steps after the last ``every_n_train_steps`` save are kept, at the end of fit and when a
SIGTERM stops the run; a checkpoint file is written beside its target and renamed over it."""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import time

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


def test_a_save_that_fills_the_disk_names_the_checkpoint_and_says_so(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos ...",
    naming neither the file nor the cause (a reviewer's run on a full tmpfs)."""
    import shutil
    from collections import namedtuple

    target = tmp_path / "ckpt" / "last.ckpt"
    io = ReplacingCheckpointIO()
    io.save_checkpoint({"global_step": 1}, target)

    def filling(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13245056 vs 13244948")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", filling)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(OSError, match=rf"could not save checkpoint {target}: the disk is full \(0.0 MiB free there\).*"
                                      r"the previous last.ckpt is kept as it was .*unexpected pos") as caught:
        io.save_checkpoint({"global_step": 2}, target)
    assert caught.value.errno == 28
    assert _saved_step(target) == 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**39, 2**39))  # room left: another failure
    with pytest.raises(OSError, match=rf"could not save checkpoint {target}: \[enforce fail") as caught:
        io.save_checkpoint({"global_step": 2}, target)
    assert caught.value.errno is None


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


class _Records(torch.utils.data.Dataset):
    """64 fixed examples; the one at ``bad`` (a dataset index) raises the DataError a truncated image gives."""

    def __init__(self, bad: int | None = None) -> None:
        self.data = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
        self.bad = bad

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        from adaptive_mllm.data.llava_json import DataError

        if index == self.bad:
            raise DataError.at("train.json", "cannot read image file x.png: image file is truncated", f"r{index}", index, "image")
        return self.data[index]


class _Records_Module(L.LightningDataModule):
    """The project's training loader (resumable mid-epoch), with LlavaDataModule's ``skip_bad_records`` option."""

    skip_bad_records = False

    def __init__(self, bad_position: int | None = None) -> None:
        super().__init__()
        self.bad_position = bad_position

    def train_dataloader(self):
        from adaptive_mllm.data.resumable import ResumableDataLoader, ResumableSampler

        records = _Records()
        sampler = ResumableSampler(records, seed=0)
        if self.bad_position is not None:  # the record at this place of the first epoch's order is bad
            records.bad = sampler.indices(0)[self.bad_position]
        loop = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # noqa: E731  (as LlavaDataModule)
        return ResumableDataLoader(records, sampler=sampler, batch_size=1, batches_consumed=loop)


def _fit_records(root, data: L.LightningDataModule, max_steps: int, ckpt_path=None, accumulate: int = 1, every: int = 100):
    checkpoint = RunCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=every)
    trainer = L.Trainer(
        default_root_dir=root, max_steps=max_steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", accumulate_grad_batches=accumulate,
    )  # fmt: skip
    L.seed_everything(0)
    model = BoringModel()
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_a_bad_record_at_a_step_boundary_saves_the_steps_done_and_the_resume_continues_exactly(tmp_path):
    """The training loader raises a DataError when Lightning fetches the next batch: after the previous step, with no
    batch part-run, the state a SIGTERM stop saves. It is saved; fixed, the run resumes from it to the very weights of
    a run that never stopped (the batches after the resume are those it would have drawn)."""
    from adaptive_mllm.data.llava_json import DataError

    whole = _fit_records(tmp_path / "whole", _Records_Module(), max_steps=8)
    with pytest.warns(UserWarning, match=r"a bad record stopped the fit at step 5: .*last\.ckpt holds step 5 \(resume with "
                      r"--ckpt_path .*last\.ckpt\); .*--data\.init_args\.skip_bad_records=true"):
        with pytest.raises(DataError, match="index 5|image file is truncated"):
            _fit_records(tmp_path / "bad", _Records_Module(bad_position=5), max_steps=8)
    last = tmp_path / "bad" / "ckpt" / "last.ckpt"
    assert _saved_step(last) == 5  # every_n_train_steps=100: without this save, all 5 steps were lost
    resumed = _fit_records(tmp_path / "bad", _Records_Module(), max_steps=8, ckpt_path=last)
    assert _saved_step(last) == 8
    for name, parameter in whole.state_dict().items():
        assert torch.equal(parameter, resumed.state_dict()[name]), name


def test_a_bad_record_mid_accumulation_saves_nothing_and_says_which_steps_are_lost(tmp_path):
    """With accumulate_grad_batches=2 the bad record is the second batch of step 3: the gradients of its first batch
    are in no checkpoint, so a save would resume a different step; nothing is saved, and the warning says so."""
    from adaptive_mllm.data.llava_json import DataError

    with pytest.warns(UserWarning, match=r"stopped the fit at step 2, part-way through the gradient accumulation of step 3 "
                      r"\(1 of its 2 batches.*\): nothing saved now .*no checkpoint is saved yet: steps 1-2 are not kept; "
                      r".*skip_bad_records=true"):
        with pytest.raises(DataError):
            _fit_records(tmp_path, _Records_Module(bad_position=5), max_steps=8, accumulate=2)
    assert not (tmp_path / "ckpt").exists()
    with pytest.warns(UserWarning, match=r"at step 3, .* of step 4 \(1 of its 2 .*: nothing saved now .*last\.ckpt holds step 2: "
                      r"step 3 is not kept"):
        with pytest.raises(DataError):  # saved every 2 steps, the last at step 2: step 3 is lost
            _fit_records(tmp_path / "every", _Records_Module(bad_position=7), max_steps=8, accumulate=2, every=2)
    assert _saved_step(tmp_path / "every" / "ckpt" / "last.ckpt") == 2


def test_under_several_processes_a_bad_record_is_saved_only_where_every_process_stopped_with_it():
    """A process stopped alone leaves the others going on into the next step's collectives (a save would wait for
    them): nothing saved. Every process stopped at the same fetch (LlavaDataModule's loaders stop them together,
    tests/test_bad_record_processes.py): the state is whole, as with one process, and judged as that one is."""
    from types import SimpleNamespace

    from adaptive_mllm.checkpoints import _not_at_a_step_boundary

    batches = SimpleNamespace(ready=4, completed=4)
    trainer = SimpleNamespace(
        world_size=2, accumulate_grad_batches=2, sanity_checking=False, validating=False, training=True, global_step=2,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=batches))),
    )  # fmt: skip
    module = SimpleNamespace(automatic_optimization=True)
    assert _not_at_a_step_boundary(trainer, module).startswith("on one of 2 processes (the others do not stop with it")
    assert _not_at_a_step_boundary(trainer, module, together=True) is None
    batches.ready = batches.completed = 5
    assert _not_at_a_step_boundary(trainer, module, together=True).startswith("part-way through the gradient accumulation")
    trainer.validating = True
    assert _not_at_a_step_boundary(trainer, module, together=True) == "while validating"


def _damaged_checkpoint(path) -> None:
    """A Lightning-like checkpoint whose zip directory is whole (check_checkpoint passes it) but whose data records are
    overwritten in the middle, as a faulty disk or copy leaves them."""
    state = {f"layer{i}.weight": torch.randn(10_000, generator=torch.Generator().manual_seed(i)) for i in range(20)}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.0", "global_step": 3}, path)
    with open(path, "r+b") as file:
        file.seek(300_000)
        file.write(b"\xff" * 200_000)


def test_a_damaged_checkpoint_is_named(tmp_path):
    from adaptive_mllm.checkpoints import CheckpointError, read_checkpoint

    path = tmp_path / "damaged.ckpt"
    _damaged_checkpoint(path)
    assert check_checkpoint(path) == path  # its zip directory is whole: only reading the data finds it
    with pytest.raises(RuntimeError, match="PytorchStreamReader"):  # what torch says, naming no file
        torch.load(path, weights_only=False)
    says = rf"checkpoint {path}: damaged \(data/\d+ unreadable: [^)]+\)"
    with pytest.raises(CheckpointError, match=says):  # export's read
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=says):  # Lightning's load in a fit (resuming)
        ReplacingCheckpointIO().load_checkpoint(path)


@pytest.mark.parametrize("given, says", [
    ("wandb://team/project/model-abc:v3", r"--ckpt_path wandb://team/project/model-abc:v3: a W&B artifact; .*`wandb artifact get"),
    ("nosuchscheme://bucket/last.ckpt", r"--ckpt_path nosuchscheme://bucket/last\.ckpt: nosuchscheme:// cannot be read here"),
    ("team/project/model-abc:v3", r"checkpoint team/project/model-abc:v3: no such file \(if it names a W&B artifact: .*wandb artifact get"),
    ("best", r"checkpoint best: no such file \(a Lightning shorthand: fit / validate / test / predict read `last`, .*need the file"),
    ("last", r"checkpoint last: no such file \(a Lightning shorthand: .*other commands and shorthands need the file"),  # serve, ask
    ("registry:model:latest", r"checkpoint registry:model:latest: no such file \(a Lightning shorthand"),
])
def test_a_checkpoint_given_as_what_cannot_be_read_here_is_named(given, says, tmp_path, monkeypatch):
    from adaptive_mllm.checkpoints import CheckpointError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=says):
        check_checkpoint(given)
    assert check_checkpoint("memory://run/last.ckpt")  # a scheme fsspec reads here is Lightning's


class Unlisted:
    """A class torch's weights_only load does not allow: its refusal is not damage."""


def _lightning_like(path, **extra) -> None:
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "pytorch-lightning_version": "2.6.0", "global_step": 3, **extra}, path)


def _with_data_pkl(source, target, change) -> None:
    """``source`` written again as ``target`` with its data.pkl's bytes changed: a whole zip archive (its entries' CRCs
    match), only the pickle inside is broken."""
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        for entry in original.infolist():
            data = original.read(entry.filename)
            copy.writestr(entry, change(data) if entry.filename.endswith("/data.pkl") else data)


@pytest.mark.parametrize("change", [
    lambda data: data[:30] + b"\x00" * 30 + data[60:],  # bytes zeroed: "invalid load key, '\x00'"
    lambda data: data[:40] + bytes(byte ^ 0xFF for byte in data[40:60]) + data[60:],  # flipped: UnicodeDecodeError
    lambda data: data[: len(data) // 2],  # cut short: "pickle data was truncated", IndexError under weights_only
], ids=["zeroed", "flipped", "cut"])
def test_a_damaged_data_pkl_is_named(change, tmp_path):
    from adaptive_mllm.checkpoints import CheckpointError, read_checkpoint

    good, path = tmp_path / "good.ckpt", tmp_path / "damaged.ckpt"
    _lightning_like(good)
    _with_data_pkl(good, path, change)
    with pytest.raises(Exception) as raw:  # torch's own error names no file, nor what is broken
        torch.load(path, weights_only=False)
    assert not isinstance(raw.value, CheckpointError) and str(path) not in str(raw.value)
    says = rf"checkpoint {path}: damaged \(its data\.pkl is not a valid pickle: .+\), not a complete checkpoint"
    with pytest.raises(CheckpointError, match=says):  # the check every command makes on --ckpt_path
        check_checkpoint(path)
    with pytest.raises(CheckpointError, match=says):  # export's read
        read_checkpoint(path)
    for weights_only in (True, False):  # Lightning's load (resuming a fit, evaluating)
        with pytest.raises(CheckpointError, match=says):
            ReplacingCheckpointIO().load_checkpoint(path, weights_only=weights_only)


def test_a_data_pkl_changed_in_place_is_named(tmp_path):
    """Bytes changed inside the archive itself: torch never checks data.pkl's CRC-32 and fails on the pickle."""
    path = tmp_path / "damaged.ckpt"
    _lightning_like(path)
    content = bytearray(path.read_bytes())
    start = content.index(b"state_dict")
    content[start : start + 5] = b"\xff" * 5
    path.write_bytes(bytes(content))
    from adaptive_mllm.checkpoints import CheckpointError

    with pytest.raises(UnicodeDecodeError):
        torch.load(path, weights_only=False)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: damaged \(its data\.pkl is not the one written: Bad CRC-32"):
        check_checkpoint(path)


def test_torchs_other_refusals_keep_their_own_message(tmp_path):
    """A whole data.pkl that torch refuses (a class weights_only does not allow, a module not installed here) raises
    the same UnpicklingError / import error as before: that is not damage, and its message says what to do."""
    from adaptive_mllm.checkpoints import CheckpointError

    path = tmp_path / "unlisted.ckpt"
    _lightning_like(path, extra=Unlisted())
    assert check_checkpoint(path) == path
    with pytest.raises(pickle.UnpicklingError, match=rf"Unsupported global: GLOBAL {Unlisted.__module__}\.Unlisted") as refused:
        ReplacingCheckpointIO().load_checkpoint(path, weights_only=True)
    assert not isinstance(refused.value, CheckpointError)
    gone = tmp_path / "gone.ckpt"  # the class's module renamed: a well-formed pickle naming a module not installed
    _with_data_pkl(path, gone, lambda data: data.replace(f"{Unlisted.__module__}\nUnlisted".encode(), b"gone_module\nUnlisted"))
    with pytest.raises(ModuleNotFoundError, match="gone_module"):
        check_checkpoint(gone)
    with pytest.raises(ModuleNotFoundError, match="gone_module"):
        ReplacingCheckpointIO().load_checkpoint(gone, weights_only=False)


def test_a_checkpoint_saved_without_crcs_is_not_called_damaged(tmp_path):
    """torch writes a CRC of 0 for every entry when CRCs are off (``set_crc32_options(False)``, for fast saves of large
    files): a whole file. Its load errors keep their own message; damage to its data.pkl is still named."""
    from adaptive_mllm.checkpoints import CheckpointError

    path = tmp_path / "nocrc.ckpt"
    torch.serialization.set_crc32_options(False)
    try:
        _lightning_like(path, extra=Unlisted())
    finally:
        torch.serialization.set_crc32_options(True)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global") as refused:
        ReplacingCheckpointIO().load_checkpoint(path, weights_only=True)
    assert not isinstance(refused.value, CheckpointError)
    assert ReplacingCheckpointIO().load_checkpoint(path, weights_only=False)["global_step"] == 3
    content = bytearray(path.read_bytes())
    start = content.index(b"state_dict")
    content[start : start + 5] = b"\xff" * 5  # no CRC to break: the pickle itself tells
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: damaged \(its data\.pkl is not a valid pickle"):
        check_checkpoint(path)


def _ended_process_id() -> int:
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(process.stdout)


def test_a_fit_removes_what_killed_saves_left_and_keeps_a_save_in_progress(tmp_path):
    """A save killed part-way (SIGKILL after SIGTERM) leaves a checkpoint-sized ``.part`` file; every restart of a
    preempted job could add one until the disk is full."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    long_ago = time.time() - 3600

    def part(pid: int, tag: str, written_at: float | None = long_ago) -> os.PathLike:
        path = folder / f".last.ckpt.{pid}-{tag}.part"
        path.write_bytes(b"x" * 1000)
        if written_at is not None:
            os.utime(path, (written_at, written_at))
        return path

    killed = part(_ended_process_id(), "0123abcd")
    restarted = part(os.getpid(), "11111111")  # a restarted container's process gets the killed one's id again
    running = part(os.getppid(), "22222222")  # its process runs on this machine: a save in progress
    fresh = part(_ended_process_id(), "33333333", written_at=None)  # written now: another node's save in progress
    other = folder / "notes.part"  # not ours
    other.write_text("keep")
    (folder / ".odd.ckpt.1-44444444.part").mkdir()  # not a file
    checkpoint = RunCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=100)
    with pytest.warns(UserWarning, match=r"removed .*\.last\.ckpt\.\d+-0123abcd\.part \(0\.00 GiB\): a checkpoint save killed"):
        _fit(tmp_path, checkpoint, BoringModel(), max_steps=2)
    assert not killed.exists() and not restarted.exists()
    assert running.exists() and fresh.exists() and other.read_text() == "keep"
    assert (folder / "last.ckpt").is_file()


def test_model_weights_given_as_a_checkpoint_say_which_option_reads_them(tmp_path):
    """`--ckpt_path model.safetensors` was "truncated ... or not a checkpoint at all", naming no option that reads it."""
    from safetensors.torch import save_file

    from adaptive_mllm.checkpoints import CheckpointError

    export, model, alone = tmp_path / "export", tmp_path / "hf-model", tmp_path / "alone"
    for directory, marker in ((export, "backbone.json"), (model, "config.json"), (alone, None)):
        directory.mkdir()
        if marker:
            (directory / marker).write_text("{}")
        save_file({"w": torch.zeros(2)}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: a safetensors weight file, not a Lightning checkpoint; .*export "
                       r"is an export \(backbone.json.*--export_dir .*export"):  # fmt: skip
        check_checkpoint(export / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"a safetensors weight file.*hf-model is a model directory in the transformers layout "
                       r"\(config.json\).*--model.backbone.init_args.checkpoint=.*hf-model .*config=null"):  # fmt: skip
        check_checkpoint(model / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"a safetensors weight file, not a Lightning checkpoint; pass a checkpoint "
                       r"`adaptive-mllm fit` wrote"):  # fmt: skip
        check_checkpoint(alone / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"a directory, but not a sharded Lightning checkpoint .*: an export"):
        check_checkpoint(export)
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")  # a bare state dict beside config.json
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: a PyTorch file but not a Lightning checkpoint .*hf-model is a "
                       r"model directory in the transformers layout"):  # fmt: skip
        check_checkpoint(model / "pytorch_model.bin")
    (alone / "garbage.ckpt").write_bytes(b"not a checkpoint at all, and longer than nine bytes")
    with pytest.raises(CheckpointError, match="truncated .* or not a checkpoint at all"):
        check_checkpoint(alone / "garbage.ckpt")
