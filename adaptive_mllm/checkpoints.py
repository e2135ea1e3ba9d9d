"""Checkpoints: :class:`RunCheckpoint`, the recipes' saving callback (its files written whole by
:class:`ReplacingCheckpointIO`), and checks on a checkpoint file before
Lightning loads it: torch's own errors for a broken file (a bare
``EOFError`` for an empty one, a zip error for a truncated one, an unpickling error for a damaged
``data.pkl``) name no file.

A checkpoint written by ``torch.save`` (as Lightning's are) is a zip archive whose directory sits at
its very end, so reading that directory is a cheap test that the file was written to the end: no
tensor data is read.
"""

from __future__ import annotations

import errno
import os
import pickletools
import random
import re
import secrets
import shutil
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from adaptive_mllm.reporting import DISK_FULL, sync_directory

SHARDED_METADATA = "meta.pt"  # what Lightning's sharded checkpoint keeps beside the shards (step, hyper-parameters)
SHARDED_MARKERS = (".metadata", "latest")  # torch.distributed.checkpoint's (FSDP), DeepSpeed's
LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong."""


def check_checkpoint(path: str | Path, required: tuple[str, ...] = LIGHTNING_KEYS) -> Path:
    """``path`` if it looks like a complete ``torch.save`` checkpoint, else a CheckpointError naming it.

    Remote paths (``s3://...``, anything with ``://``) are left to Lightning once fsspec can open their scheme
    here (a W&B artifact, ``wandb://``, never is); a directory only needs the marker of a sharded checkpoint
    (Lightning reads the shards itself); a file needs the ``required`` keys (Lightning's loading needs both of
    ``LIGHTNING_KEYS``, reading the weights only ``state_dict``).
    """
    if "://" in str(path):
        _check_remote(str(path))
        return Path(path)
    path = Path(path)
    if not path.exists():
        hint = f" (if it names a W&B artifact: {WANDB_ARTIFACTS})" if ARTIFACT_NAME.fullmatch(str(path)) else ""
        if str(path) in LIGHTNING_SHORTHANDS or str(path).startswith("registry"):
            hint = (
                " (a Lightning shorthand: fit / validate / test / predict read `last`, the newest last*.ckpt of the "
                "recipe's checkpoint folders; other commands and shorthands need the file, e.g. <run>/checkpoints/last.ckpt)"
            )
        raise CheckpointError(f"checkpoint {path}: no such file{hint}")
    if path.is_dir():
        if not any((path / marker).is_file() for marker in SHARDED_MARKERS):
            weights = _model_weights(path)
            what = f"): {weights}" if weights else "; a model directory in the transformers layout is a backbone's `checkpoint`, not a --ckpt_path)"
            raise CheckpointError(
                f"checkpoint {path}: a directory, but not a sharded Lightning checkpoint (no {' or '.join(SHARDED_MARKERS)}{what}"
            )
        return path
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes); the run that wrote it was probably killed while saving")
    if _is_safetensors(path):
        raise CheckpointError(f"checkpoint {path}: a safetensors weight file, not a Lightning checkpoint; {_what_to_pass(path)}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        where = _model_weights(path.parent)
        if where is not None:  # a model's weight file (an old-format pytorch_model.bin), not a truncated checkpoint
            raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint ({error}); {path.parent} is {where}") from error
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes): not a complete PyTorch checkpoint ({error}); it is truncated "
            "(the run that wrote it was killed, or a copy stopped early) or not a checkpoint at all"
        ) from error
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise CheckpointError(f"checkpoint {path}: a zip archive without data.pkl, not a PyTorch checkpoint")
    _check_keys(path, required)
    return path


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length, then the header's
    JSON ``{`` (torch.save's zip starts ``PK``). A model's weights given as --ckpt_path are one (HF's, an export's)."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def _model_weights(directory: Path) -> str | None:
    """What ``directory`` is and which option reads it, where it holds a model's weights rather than a Lightning
    checkpoint: an export (backbone.json, written by `adaptive-mllm export`), or a model in the transformers layout
    (config.json); None otherwise."""
    if (directory / "backbone.json").is_file():
        return (
            f"an export (backbone.json: `adaptive-mllm export` wrote it): ask / serve read it as --export_dir {directory} "
            "(Python: adaptive_mllm.export.load_exported); validate / test / predict take the Lightning checkpoint it was "
            f"exported from ({FIT_CHECKPOINTS})"
        )
    if (directory / "config.json").is_file():
        return (
            f"a model directory in the transformers layout (config.json): a recipe builds its backbone from it with "
            f"--model.backbone.init_args.checkpoint={directory} (and --model.backbone.init_args.config=null where the "
            "recipe sets sizes)"
        )
    return None


FIT_CHECKPOINTS = "runs/<run>/checkpoints/*.ckpt"  # where `adaptive-mllm fit` saves Lightning checkpoints


def _what_to_pass(path: Path) -> str:
    """For a file that is no Lightning checkpoint: what its folder is and which option reads it, or what to pass."""
    weights = _model_weights(path.parent)
    return f"{path.parent} is {weights}" if weights else f"pass a checkpoint `adaptive-mllm fit` wrote ({FIT_CHECKPOINTS})"


WANDB_ARTIFACTS = (
    "W&B artifacts are not fetched: download it with `wandb artifact get <entity>/<project>/<name>:<version>` and "
    "pass the .ckpt file it writes"
)
LIGHTNING_SHORTHANDS = ("last", "best", "hpc")  # with "registry[:...]": what Lightning reads as ckpt_path besides a path


def newest_last_checkpoint(folders: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` (file, or sharded folder) in ``folders``, as Lightning's ``ckpt_path="last"`` picks
    it; None where there is none."""
    found = [
        path
        for folder in folders
        if folder.is_dir()
        for path in folder.iterdir()
        if path.suffix == ".ckpt" and path.stem.startswith("last")  # last.ckpt, last-v1.ckpt: Lightning's match
    ]
    return max(found, key=lambda path: (path.stat().st_mtime, path.name), default=None)


ARTIFACT_NAME = re.compile(r"[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+")  # entity/project/name:version, as W&B names artifacts


def _check_remote(path: str) -> None:
    """A CheckpointError for a URL whose scheme fsspec cannot open here (its own message names no option)."""
    import fsspec

    scheme = path.split("://", 1)[0]
    if scheme in ("wandb", "wandb-artifact"):
        raise CheckpointError(f"--ckpt_path {path}: a W&B artifact; {WANDB_ARTIFACTS}")
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as error:
        raise CheckpointError(
            f"--ckpt_path {path}: {scheme}:// cannot be read here ({error}); copy the checkpoint to a local file and pass "
            "that"
        ) from None


@contextmanager
def damage_named(path: str | Path | None) -> Iterator[None]:
    """Reading a checkpoint: torch's error on one whose archive is whole but whose data is not (``PytorchStreamReader
    failed reading file data/76: invalid header or archive is corrupted``, no file named), or whose ``data.pkl`` is
    damaged (a bare ``invalid load key``, ``UnicodeDecodeError``, ``IndexError``, ...), becomes a CheckpointError
    naming ``path``; any other error passes unchanged.

    ``data.pkl`` is judged by its own bytes (:func:`pickle_damage`), not by torch's message: torch's ``weights_only``
    refusal of a class it does not allow is the same ``UnpicklingError`` as its refusal of a broken stream."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        message = str(error)
        if isinstance(error, RuntimeError) and "PytorchStreamReader" in message:
            found = re.search(r"failed reading file (\S+?): (.+?)(?:\. |\.?$)", message)
            detail = f"{found[1]} unreadable: {found[2]}" if found else message.split(". ")[0]
        elif path is not None and "://" not in str(path) and Path(path).is_file():
            detail = pickle_damage(path)
            if detail is None:
                raise
        else:
            raise
        raise CheckpointError(
            f"checkpoint {path}: damaged ({detail}), not a complete checkpoint; its bytes changed after it was written "
            "(a faulty copy or disk): copy it again, or use another checkpoint"
        ) from None


def pickle_damage(path: str | Path) -> str | None:
    """What is wrong with the ``data.pkl`` of a ``torch.save`` zip file, or None where it is whole and well formed (or
    there is none to read). Its bytes are checked against the archive's CRC-32 (torch does not check it), then its
    opcodes decoded and their stack and memo use checked (``pickletools.dis``): nothing is unpickled, no class
    looked up."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):  # not a zip, or not readable: check_checkpoint names those
        return None
    with archive:
        name = next((name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"), None)
        if name is None:
            return None
        try:
            data = _entry_bytes(archive, name)
        except (zipfile.BadZipFile, zlib.error) as error:  # "Bad CRC-32 for file 'last/data.pkl'"
            return f"its data.pkl is not the one written: {error}"
        except OSError:
            return None
    try:
        pickletools.dis(data, out=_Discard())
    except Exception as error:  # ValueError (unknown opcode, truncated, stack, memo), UnicodeDecodeError, ...
        detail = str(error) if type(error) is ValueError else f"{type(error).__name__}: {error}"
        return f"its data.pkl is not a valid pickle: {detail}"
    return None


def _entry_bytes(archive: zipfile.ZipFile, name: str) -> bytes:
    """An entry's bytes, its CRC-32 checked where one was written: torch saves a CRC of 0 for every entry when CRCs
    are off (``torch.serialization.set_crc32_options(False)``), a whole file that ``zipfile`` would call damaged."""
    info = archive.getinfo(name)
    if info.CRC != 0:
        return archive.read(info)
    with archive.open(info) as entry:
        entry._expected_crc = None  # zipfile's own switch, as for entries written without a CRC
        return entry.read()


class _Discard:
    """A text sink for ``pickletools.dis``: only its checks are wanted."""

    def write(self, text: str) -> int:
        return len(text)


def peek_checkpoint(path: str | Path) -> Any:
    """What a checkpoint file holds besides its tensor data (memory-mapped: no tensor data is read); for a
    sharded checkpoint directory, its ``meta.pt`` (everything but the weights). None where there is no such
    file, or torch cannot map it (an old, non-zip format)."""
    path = Path(path)
    if path.is_dir():
        path = path / SHARDED_METADATA
    if not path.is_file():
        return None
    try:
        with damage_named(path):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:
        return None


def _check_keys(path: Path, required: tuple[str, ...]) -> None:
    """A PyTorch file that is not a Lightning checkpoint (a bare state dict, say) would fail inside Lightning
    on a missing key."""
    content = peek_checkpoint(path)
    if content is None:  # left to Lightning
        return
    missing = [key for key in required if not (isinstance(content, dict) and key in content)]
    if missing:
        found = sorted(map(str, content))[:5] if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"checkpoint {path}: a PyTorch file but not a Lightning checkpoint (no {', '.join(repr(k) for k in missing)}; "
            f"found {found}); {_what_to_pass(path)}"  # e.g. pytorch_model.bin beside a model's config.json
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict in this one process, whichever way it was written: a ``.ckpt``
    file (DDP, or sharded training with ``save_distributed_checkpoint: false``), or the directory sharded
    training writes by default (each rank's shards, read back whole with ``torch.distributed.checkpoint``;
    its optimizer states are left out, export needs only the weights)."""
    path = check_checkpoint(path, required=("state_dict",))
    if not path.is_dir():
        with damage_named(path):
            return torch.load(path, map_location="cpu", weights_only=False)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = path / SHARDED_METADATA
    if not (path / ".metadata").is_file() or not metadata.is_file():
        raise CheckpointError(f"checkpoint {path}: a directory, but not a sharded Lightning checkpoint (no .metadata / {SHARDED_METADATA})")
    checkpoint: dict[str, Any] = {}
    reader = FileSystemReader(path)
    _load_state_dict(checkpoint, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    checkpoint.update(torch.load(metadata, map_location="cpu", weights_only=False))
    return checkpoint


class ReplacingCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a checkpoint file is written beside its target and renamed over it
    (``os.replace``, atomic on POSIX) once it is whole and on disk, so a kill while saving leaves the previous
    ``last.ckpt`` as it was. Lightning's own stages the file in the system temp dir and moves it: across filesystems
    that is a copy that truncates the target first, a small ``/tmp`` fails a 7B save, and the file is held in memory
    first. Remote paths (``s3://...``) and ``storage_options`` stay Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")  # not a *.ckpt
        try:
            with open(temporary, "xb") as file:  # mode 0o666 less the umask, as Lightning's files
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as "unexpected pos ..."
            try:
                free: int | None = shutil.disk_usage(path.parent).free  # before the temporary file gives its space back
            except OSError:
                free = None
            temporary.unlink(missing_ok=True)
            raise save_failure(path, error, free) from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        sync_directory(path.parent)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Lightning's, with a damaged file named (torch's error names none)."""
        with damage_named(path):
            return super().load_checkpoint(path, *args, **kwargs)


DISK_NEARLY_FULL = 64 * 2**20  # bytes free when a save failed: below this, the failure is taken for a full disk


def save_failure(path: Path, error: OSError | RuntimeError, free: int | None) -> OSError:
    """A failed save as an error that names the checkpoint, says where the disk was full (torch's zip writer names
    neither: "[enforce fail at inline_container.cc:672] . unexpected pos 13245056 vs 13244948") and what is kept."""
    code = getattr(error, "errno", None)
    full = code in DISK_FULL or (free is not None and free < DISK_NEARLY_FULL)
    if full:
        room = "" if free is None else f" ({free / 2**20:.1f} MiB free there)"
        reason = f"the disk is full{room}; free space and resume"
    else:
        reason = str(error)
    kept = f"; the previous {path.name} is kept as it was" if path.exists() else ""
    message = f"could not save checkpoint {path}: {reason}{kept} ({type(error).__name__}: {error})"
    code = errno.ENOSPC if full and code is None else code
    return OSError(code, message) if code is not None else OSError(message)


KILLED_SAVE = re.compile(r"\..+\.ckpt\.(\d+)-[0-9a-f]{8}\.part")  # ReplacingCheckpointIO's temporary file


def remove_killed_saves(directory: Path) -> list[tuple[Path, int]]:
    """Remove the temporary files that saves killed part-way (SIGKILL after a preempted job's SIGTERM) left in
    ``directory``, each as large as a checkpoint: every restart of such a job could add one until the disk is full.
    Left: a file written in the last ``SAVE_QUIET_SECONDS`` (a save in progress, on another node of a shared folder
    too: its process id means nothing here), and one whose process runs on this machine, unless that process is this
    one (a restarted container gets the killed one's id again; this process is not saving yet). Returns (path, bytes)."""
    removed = []
    now = time.time()
    for path in sorted(directory.glob(".*.part")) if directory.is_dir() else []:
        match = KILLED_SAVE.fullmatch(path.name)
        if match is None or not path.is_file() or path.is_symlink():
            continue
        pid = int(match.group(1))
        try:
            status = path.stat()
            if now - status.st_mtime < SAVE_QUIET_SECONDS or (pid != os.getpid() and _process_runs(pid)):
                continue
            path.unlink()
        except FileNotFoundError:  # removed meanwhile
            continue
        removed.append((path, status.st_size))
    return removed


SAVE_QUIET_SECONDS = 600  # a save writes its file without pause: one unchanged this long is no save in progress


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none runs; no process can have that number
        return False
    except PermissionError:  # another user's
        pass
    return True


def use_replacing_writes(strategy: Any) -> None:
    """Give ``strategy`` a ReplacingCheckpointIO where it would use Lightning's plain TorchCheckpointIO. A plugin the
    user chose (its own CheckpointIO, AsyncCheckpointIO, XLA's) stays; FSDP's sharded and DeepSpeed's checkpoints
    (directories) never go through it, their full single-file ones do."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = ReplacingCheckpointIO()


RANDOM_STATE_KEY = "random_states"  # in RunCheckpoint's state: one per process, in rank order


def random_state() -> dict[str, Any]:
    """This process's global random generators, in types a weights-only load reads (tensors, tuples, ints)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def every_process(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (collective: every process calls it, as every process saves)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def resumable_loop_state(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved after an epoch was marked done (at the end of fit, or by a SIGTERM at an epoch's end)
    resume where the run stopped; Lightning restores such a state wrongly.

    Lightning marks the epoch done when its loop stops, whether every batch ran (the epoch's end) or ``max_steps``
    stopped it part-way, while the epoch loop still counts the finished epoch's batches. Restored as it is, the
    next epoch starts already counting them: it runs one batch (a whole epoch's order skipped, later ones shifted),
    and an epoch left part-way is never finished. Here the saved counters say what happened: after a whole epoch,
    the next one has not started (its batch counts at zero, as Lightning's own start of an epoch sets them); after a
    part of one, the epoch is still running (not done), as in a save made at its last step. Set from the live loop
    state, so applying it twice changes nothing."""
    loops = checkpoint.get("loops", {}).get("fit_loop")
    epochs = trainer.fit_loop.epoch_progress
    if not loops or trainer.state.fn != "fit" or epochs.current.processed != epochs.current.started or epochs.current.started == 0:
        return  # not after an epoch was marked done (the saves every n steps, at an epoch end hook, before any epoch)
    if trainer.fit_loop.epoch_loop.batch_progress.current.completed >= trainer.num_training_batches:
        for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress", "epoch_loop.automatic_optimization.optim_progress"):
            _zero_counts(loops.get(key, {}), "current")
        loops.get("epoch_loop.batch_progress", {})["is_last_batch"] = False
        _zero_counts(loops.get("epoch_loop.val_loop.batch_progress", {}), "total")
        return
    saved = loops.get("epoch_progress", {})
    if not all(isinstance(saved.get(part), dict) for part in ("current", "total")):  # another Lightning's layout
        rank_zero_warn("the checkpoint's loop state is not in the layout RunCheckpoint knows: saved as Lightning made it")
        return
    for part in ("current", "total"):
        live = getattr(epochs, part)
        saved[part].update(processed=live.started - 1, completed=live.started - 1)


def _zero_counts(progress: dict[str, Any], part: str) -> None:
    """Every ``part`` (``current`` / ``total``) counter in a Lightning progress state, nested ones too, set to 0."""
    for key, value in progress.items():
        if key == part and isinstance(value, dict):
            progress[key] = {name: 0 for name in value}
        elif isinstance(value, dict):
            _zero_counts(value, part)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also keeps the steps after its last ``every_n_train_steps`` save: at
    the end of fit (a 5,200-step epoch saved every 500 steps lost its last 200, and ``test_after_fit`` scored
    weights saved nowhere), and when the run is stopped by SIGTERM (a preempted job: Lightning stops every
    process together between two steps, so the state is whole; resume from ``last.ckpt``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Checkpoint files are written beside their target and renamed over it (ReplacingCheckpointIO)."""
        super().setup(trainer, pl_module, stage)
        use_replacing_writes(trainer.strategy)
        if stage == "fit" and trainer.is_global_zero and self.dirpath is not None and "://" not in str(self.dirpath):
            for path, size in remove_killed_saves(Path(self.dirpath)):
                rank_zero_warn(f"removed {path} ({size / 2**30:.2f} GiB): a checkpoint save killed part-way left it")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from adaptive_mllm.data.errors import DataError  # here: the data package is heavy

        if isinstance(exception, SIGTERMException):
            self._save_now(trainer)
        elif isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            # Ctrl+C lands anywhere, possibly inside an optimizer step: a save now could hold half-updated weights
            saved = self.last_model_path or "nothing yet"
            rank_zero_warn(
                f"interrupted at step {trainer.global_step}: the steps after the last save ({saved}) are not kept. "
                "To stop a run and keep them, send SIGTERM (kill <pid>): it stops after the current step and saves "
                "last.ckpt"
            )
        elif isinstance(exception, DataError) and trainer.state.fn == "fit":
            self._stopped_by_a_bad_record(trainer, pl_module, exception)

    def _stopped_by_a_bad_record(
        self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException | None = None
    ) -> None:
        """A bad record (a DataError from the training loader, e.g. a truncated image deep in the data) stops the fit.
        Lightning fetches the next batch at the start of its loop, after the previous batch's step, hooks and
        validation: raised there, at an optimizer-step boundary, the state is the one a SIGTERM stop saves (the
        batches consumed counted, no batch part-run), so it is saved as that one is. Under several processes that
        holds where every process raised it at that same fetch (``error.stopped_together``: LlavaDataModule's loaders
        stop them all on a bad record any one meets), and the save is theirs together. Anywhere else (part-way through
        a gradient accumulation, inside a batch, in validation, on one of several processes alone) nothing is saved,
        and the warning says which steps are lost."""
        step = trainer.global_step
        if step == 0 and self._resumed_from is None and not self._last_checkpoint_saved:
            return  # before any step (setup, the sanity check, the first batch): nothing to keep, nothing lost
        not_whole = _not_at_a_step_boundary(trainer, pl_module, together=getattr(error, "stopped_together", False))
        if not_whole is None:
            self._save_now(trainer)  # skipped where this step is saved already
        path, saved = self._kept(trainer)
        kept = f"{path} holds step {saved}" if path else "no checkpoint is saved yet"
        lost = "" if saved >= step else f": step {step} is not kept" if saved + 1 == step else f": steps {saved + 1}-{step} are not kept"
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "skip_bad_records", None) is False:
            fix = "; to drop bad records with a warning instead of stopping, add --data.init_args.skip_bad_records=true"
        else:
            fix = ""
        other = getattr(error, "met_by_process", None)
        bad = "a bad record" if other is None else f"a bad record met by process {other} (see its error)"
        if not_whole is None:
            message = f"{bad} stopped the fit at step {step}: {kept} (resume with --ckpt_path {path}){fix}"
        else:
            message = (
                f"{bad} stopped the fit at step {step}, {not_whole}: nothing saved now (that state would not "
                f"resume correctly); {kept}{lost}{fix}"
            )
        warnings.warn(message, UserWarning, stacklevel=2)  # every process that has it: rank_zero_warn hides the others'

    def _kept(self, trainer: L.Trainer) -> tuple[str, int]:
        """The checkpoint holding the latest state saved (path, step): this run's last save, else the checkpoint
        it resumed from; ("", 0) where there is none."""
        if self._last_checkpoint_saved:
            return str(self._last_checkpoint_saved), self._last_global_step_saved
        if self._resumed_from is not None:
            return self._resumed_from
        return "", 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._random_state: dict[str, Any] | None = None  # this process's, from the checkpoint resumed
        self._resumed_from: tuple[str, int] | None = None  # the checkpoint a resumed fit started from, and its step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resumable_loop_state(trainer, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state, and every process's random generators (torch's, CUDA's, Python's): the budgets
        drawn per example and the schedulers' Gumbel noise continue after a resume as they would have without it,
        instead of restarting from the seed's first numbers."""
        return {**super().state_dict(), RANDOM_STATE_KEY: every_process(random_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        states = state_dict.get(RANDOM_STATE_KEY)
        self._random_state = None
        if states:
            world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            if len(states) == world_size:
                self._random_state = states[torch.distributed.get_rank() if world_size > 1 else 0]
            else:
                rank_zero_warn(
                    f"the checkpoint was saved by {len(states)} processes, this run has {world_size}: the random draws "
                    "(budgets, Gumbel noise) go on from this run's seed, not from where the saved run stopped"
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed_from = (str(trainer.ckpt_path), trainer.global_step) if trainer.ckpt_path else None
        if self._random_state is not None:  # after the sanity check, just before the first resumed step
            set_random_state(self._random_state)
            self._random_state = None

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # fast_dev_run, not fitting, or this step already saved
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def _not_at_a_step_boundary(trainer: L.Trainer, pl_module: L.LightningModule, together: bool = False) -> str | None:
    """None where a fit stopped by an exception stands whole between two optimizer steps of one process, as a
    SIGTERM stop does (Lightning raises that after a batch's hooks and validation, before the next fetch); else why
    not. Whole: one process, or every process stopped at the same point (``together``; a process stopped alone leaves
    the others going on into the next step's collectives), training (not validating), automatic optimization, every
    batch started this epoch finished, and the batches at a gradient accumulation's end."""
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    accumulation = max(1, int(trainer.accumulate_grad_batches))
    if trainer.world_size > 1 and not together:
        return f"on one of {trainer.world_size} processes (the others do not stop with it; a save would wait for them)"
    if trainer.sanity_checking or trainer.validating:
        return "while validating"
    if not trainer.training:
        return "outside the training loop"
    if not pl_module.automatic_optimization:
        return "with manual optimization (where its steps end cannot be told)"
    if batches.ready != batches.completed:
        return "inside a training batch"
    if batches.ready == 0:
        return "before the epoch's first batch"
    if batches.ready % accumulation:
        return (
            f"part-way through the gradient accumulation of step {trainer.global_step + 1} "
            f"({batches.ready % accumulation} of its {accumulation} batches, whose gradients a checkpoint does not hold)"
        )
    return None
