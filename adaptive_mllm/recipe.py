"""Recipes: the LightningCLI over AdaptiveMLLM that reads a YAML recipe (and flags) into a model,
a datamodule and a trainer.

It sits below the subcommands: ``cli`` runs it for fit / validate / test / predict, and
``benchmark`` and ``export`` build their model through it (``run=False``).

The parts' packages are imported here so that short class names resolve, e.g.
``--model.scheduler=LayerScheduler`` or ``--data=ShapesVQADataModule``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import adaptive_mllm.backbones  # noqa: F401  (short class names in configs)
import adaptive_mllm.data  # noqa: F401
import adaptive_mllm.schedulers  # noqa: F401
import adaptive_mllm.token_selection  # noqa: F401
from adaptive_mllm.callbacks import REPORT_FILES
from adaptive_mllm.checkpoints import CheckpointError, check_checkpoint, damage_named, newest_last_checkpoint
from adaptive_mllm.data.directory_lock import DirectoryLock
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.prediction_writer import PredictionWriter, new_directory
from adaptive_mllm.recipe_files import RecipeParser, check_recipe_files
from adaptive_mllm.reporting import unwritable_reason
from adaptive_mllm.tracking import (
    ResilientWandbLogger,
    WandbRunRecord,
    continue_wandb_run,
    recorded_wandb_run,
)

RUN_DIRECTORY_VARIABLE = "ADAPTIVE_MLLM_RUN_DIR"
#: a trainer that is built by the CLI but never run: one CPU process, no logger
UNUSED_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false"]


class SaveConfigToWandb(SaveConfigCallback):
    """Writes the resolved config beside the run and pushes it to W&B. A resumed fit whose config differs
    keeps the first one and writes its own as ``config-resumed-<time>.yaml``: a run's files are never replaced."""

    made: Path | None = None  # the config file this fit created (none was there before), while it has not stepped

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and stage == "fit" and trainer.log_dir is not None:
            first = Path(trainer.log_dir) / "config.yaml"
            if first.is_file() and first.read_text() != self.parser.dump(self.config, skip_none=False):
                self.config_filename = f"config-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        target = Path(trainer.log_dir) / self.config_filename if not self.already_saved and trainer.log_dir else None
        new = target is not None and not target.exists()
        super().setup(trainer, pl_module, stage)
        if new and stage == "fit" and trainer.is_global_zero and target.is_file():
            self.made = target

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.config.update(wandb_config(self.config.as_dict(), self.config_filename), allow_val_change=True)


def wandb_config(config: dict[str, Any], filename: str) -> dict[str, Any]:
    """What goes into the W&B run's config: the run's config, or a resumed fit's other config under its own key
    (``config-resumed-<time>``), so the continued W&B run keeps the flags it was started with, as the files do."""
    if filename.startswith("config-resumed-"):
        return {filename.removesuffix(".yaml"): config}
    return config


class AdaptiveMLLMCLI(LightningCLI):
    """LightningCLI with runs that keep their files, a checked checkpoint, and ``--test_after_fit``.

    ``validate`` / ``test`` / ``predict`` write into ``default_root_dir`` when it is new or empty, else into a
    new ``<default_root_dir>/<subcommand>/<time>`` (config, tables, plots, answers, W&B run), so evaluating a
    training run's checkpoint never replaces the training run's files; ``fit`` refuses a directory that holds another run unless it resumes it
    (``--ckpt_path``) or ``--overwrite_run=true`` says to replace it.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run `test` on the trained weights after fit")
        parser.add_argument(
            "--overwrite_run", type=bool, default=False, help="let `fit` replace the run already in its directory"
        )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        """Without subcommands (a tool reading a recipe: export, serve, profile, memory, ...) the parser also takes
        what a fit's saved ``config.yaml`` records of its command, so a run's own config is a recipe; the tool's
        own ``--ckpt_path`` says which weights it reads."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            self.parser.add_argument("--ckpt_path", type=str | None, default=None, help="a saved run's; not read here")
            self.parser.add_argument("--weights_only", type=bool | None, default=None, help="a saved run's; not read here")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads the checkpoint's hyperparameters."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.fresh_from_last = None
        if subcommand and config.get("ckpt_path") == "last":
            config.ckpt_path = _resolve_last(config, subcommand)
            self.fresh_from_last = None if config.ckpt_path else _checkpoint_folders(config)
        if config.get("ckpt_path"):
            check_checkpoint(config.ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the whole checkpoint here (its hyperparameters): the first place a damaged one fails."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # without one: the tools' parse (run=False)
        with damage_named(config.get("ckpt_path")):
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if subcommand == "fit":
                self._release_a_fit_that_never_stepped()
            raise
        finally:
            if self.fit_lock is not None:
                self.fit_lock.release()

    fit_lock: DirectoryLock | None = None  # this fit's hold on its root (``_hold_root``)

    def _hold_root(self, root: Path) -> None:
        """One fit at a time in a root: two started together would both find it empty and mix their checkpoints
        (``last.ckpt`` and ``last-v1.ckpt``, nothing saying whose). The hold is ``flock`` on a file in the root,
        dropped by the operating system when the process ends, however it ends."""
        lock = DirectoryLock(root, FIT_LOCK)
        try:
            root.mkdir(parents=True, exist_ok=True)
            held = lock.try_exclusive()
        except OSError:
            return  # a root this process cannot write: the checkpoint folders' check names it
        if not held:
            lock.release()
            raise FileExistsError(
                f"{root}: another fit is running in this directory; wait for it to end (then resume it with --ckpt_path "
                "last), or give this run its own directory (--trainer.default_root_dir)"
            )
        self.fit_lock = lock

    def _release_a_fit_that_never_stepped(self) -> None:
        """A fit that failed before its first optimizer step (a flag refused at setup, a bad record in the sanity
        check) trained nothing and saved no checkpoint: the config file it wrote goes, so that the corrected command
        is not refused as a second run in that directory (validate / test / predict give their directory back the
        same way). A fit that took a step keeps its files: they are a run."""
        if _launched() or self.trainer.global_step > 0:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigToWandb) and callback.made is not None:
                callback.made.unlink(missing_ok=True)
                callback.made = None

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("validate", "test", "predict"):
            _own_directory(self.config[self.subcommand], self.subcommand)
            rank_zero_info(f"{self.subcommand}: this run writes into {self.config[self.subcommand].trainer.default_root_dir}")
        elif self.subcommand == "fit":
            _follow_root(self.config["fit"])

    def before_fit(self) -> None:
        config = self.config["fit"]
        self._drop_learning_rate_monitors_without_a_logger()
        if config.get("ckpt_path") and config.get("overwrite_run"):
            raise ValueError(
                "--ckpt_path resumes a run, --overwrite_run=true replaces the run in this directory: give one of them "
                "(a new run from a checkpoint's weights: its own --trainer.default_root_dir with --ckpt_path)"
            )
        root = Path(self.trainer.default_root_dir)
        if not _launched() and "://" not in str(root):
            self._hold_root(root)
        # only the process the user started decides: processes a strategy launches may find rank 0's files
        earlier = None if _launched() else _earlier_run(self.trainer)
        set_aside = _set_aside_run_of(config.get("ckpt_path"), root)
        if earlier is not None and set_aside is not None:
            raise FileExistsError(
                f"--ckpt_path {config.ckpt_path} is a checkpoint of the run --overwrite_run set aside in {set_aside}, not of "
                f"the run now in {root} (it holds {earlier}): resumed here it would replace that run's checkpoints; "
                f"resume it in its own folder, --trainer.default_root_dir {set_aside}"
            )
        if earlier is not None and config.get("ckpt_path") and not _own_checkpoint(config.ckpt_path, self.trainer):
            raise FileExistsError(
                f"--ckpt_path {config.ckpt_path} is not a checkpoint of the run in {root} (it holds {earlier}): continued "
                "there the two runs would mix; a new run from a checkpoint's weights needs its own "
                "--trainer.default_root_dir with --ckpt_path, resuming this run one of its own checkpoints (last.ckpt)"
            )
        if earlier is not None and self.fresh_from_last and not config.get("overwrite_run"):
            raise FileExistsError(
                f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, self.fresh_from_last))}, but "
                f"{_place(earlier, root)} holds an earlier run ({earlier}) that saved none: give this run its own "
                "directory (--trainer.default_root_dir), or replace that one with --overwrite_run=true"
            )
        if earlier is not None and not config.get("ckpt_path") and not config.get("overwrite_run"):
            raise FileExistsError(
                f"{_place(earlier, root)} holds an earlier run ({earlier}): resume it with --ckpt_path (its checkpoints' "
                "last.ckpt), give this run its own directory (--trainer.default_root_dir), or replace it with "
                "--overwrite_run=true"
            )
        if earlier is not None and not config.get("ckpt_path") and config.get("overwrite_run"):
            kept = set_aside_run(root, _checkpoint_dirs(self.trainer), _versioned_log_dirs(self.trainer))
            rank_zero_info(f"fit: --overwrite_run moved the earlier run's files to {kept} (delete it when you no longer need them)")
        for directory in _checkpoint_dirs(self.trainer):  # found now, not at the first save (every step lost)
            _check_writable(
                directory, "checkpoint folder", "fit would train until its first save and keep nothing",
                "--trainer.default_root_dir, or the checkpoint callback's dirpath",
            )  # fmt: skip
        for index, logger in enumerate(self.trainer.loggers):  # now, not deep in W&B or at the first log
            if getattr(logger, "save_dir", None):
                _check_writable(
                    logger.save_dir, f"{type(logger).__name__}'s logger folder",
                    "fit would fail in setup or lose its logs", _logger_setting(config, index),
                )  # fmt: skip
        wandb_loggers = [logger for logger in self.trainer.loggers if isinstance(logger, ResilientWandbLogger)]
        if wandb_loggers:
            self.trainer.callbacks.append(WandbRunRecord())
            run_id = recorded_wandb_run(config.ckpt_path) if config.get("ckpt_path") else None
            if run_id and not _own_checkpoint(config.ckpt_path, self.trainer):
                # a checkpoint of another run, continued in a directory of its own: a W&B run of its own too (the
                # same id would make `wandb sync` of both directories one run, the second's config over the first's)
                rank_zero_info(f"fit: {config.ckpt_path} is not this run's ({root}): a new W&B run, not its run {run_id}")
                run_id = None
            for logger in wandb_loggers if run_id else []:
                continue_wandb_run(logger, run_id)
        if config.get("test_after_fit") and not _has_test_split(self.datamodule):
            rank_zero_warn(f"test_after_fit: {type(self.datamodule).__name__} has no test split; only fit runs")

    def _drop_learning_rate_monitors_without_a_logger(self) -> None:
        """``--trainer.logger=false`` with a recipe that lists a LearningRateMonitor (every shipped one does): Lightning
        stops the fit at its start (``Cannot use LearningRateMonitor callback with Trainer that has no logger``), after
        the model is built, and no flag removes one entry of the recipe's callback list. The monitor is left out with a
        warning instead of refusing the run: without a logger it has nowhere to write the learning rate, so leaving it
        out loses nothing the run would have kept."""
        if self.trainer.loggers:
            return
        monitors = [callback for callback in self.trainer.callbacks if isinstance(callback, LearningRateMonitor)]
        if monitors:
            self.trainer.callbacks[:] = [callback for callback in self.trainer.callbacks if callback not in monitors]
            rank_zero_warn(
                "fit: no logger (trainer.logger is false): the recipe's LearningRateMonitor is left out, it logs the "
                "learning rate to a logger; keep a logger to record it (e.g. --trainer.logger=true: Lightning's default, local CSV or TensorBoard files)"
            )

    def before_predict(self) -> None:
        """Answers are kept: a PredictionWriter joins the trainer unless the recipe lists one."""
        if not any(isinstance(callback, PredictionWriter) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        config = self.config["fit"]
        if config.get("test_after_fit") and not self.trainer.fast_dev_run and _has_test_split(self.datamodule):
            try:
                self.trainer.test(self.model, datamodule=self.datamodule)
            except SIGTERMException as stopped:  # training is done and saved: the command's message says so
                stopped.during_test_after_fit = True
                raise


def build_cli(args: list[str] | None = None, run: bool = True) -> AdaptiveMLLMCLI:
    """The recipe's CLI; ``run=False`` only builds the model, datamodule and trainer from ``args``."""
    check_recipe_files(sys.argv[1:] if args is None else list(args))
    try:
        return AdaptiveMLLMCLI(
            AdaptiveMLLM,
            subclass_mode_data=True,
            parser_class=RecipeParser,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},  # fit checks for an earlier run itself (before_fit)
            seed_everything_default=0,
            args=args,
            run=run,
        )
    except BaseException:
        _release_unused_claims()
        raise
    finally:
        _claimed.clear()


def parse_recipe(args: list[str]) -> AdaptiveMLLMCLI:
    """The recipe's model, datamodule and trainer from ``args`` (``--config R`` and flags), nothing run.
    LightningCLI parses only ``args``, not the calling command's own ``sys.argv``."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds more than the program
    try:
        return build_cli(args, run=False)
    finally:
        sys.argv = argv


def build_model(args: list[str], device: str = "cpu") -> AdaptiveMLLM:
    """The recipe's module with its weights created (or loaded from the backbone's checkpoint) on ``device``,
    after the datamodule has prepared what the backbone reads (e.g. the tiny recipe's generated tokenizer)."""
    cli = parse_recipe(args)
    if cli.datamodule is not None and hasattr(cli.datamodule, "prepare_data"):
        cli.datamodule.prepare_data()
    with torch.device(device):  # random weights drawn where they run: seconds for 7B on a GPU, minutes on a CPU
        cli.model.configure_model()
    return cli.model


def _follow_root(config: Any) -> None:
    """A fit's logs and checkpoints go where its ``default_root_dir`` says, unless the recipe places them
    elsewhere: a logger without a ``save_dir`` writes into the root, a checkpoint callback without a ``dirpath``
    into ``<root>/checkpoints``. So one flag moves a whole run, and a second run never shares the first's
    checkpoint folder (where ``--ckpt_path .../last.ckpt`` would resume the wrong run)."""
    root = config.trainer.get("default_root_dir")
    if not root:
        return
    for logger in _entries(config.trainer.get("logger")):
        if "save_dir" in logger.init_args and logger.init_args.save_dir in (None, "."):
            logger.init_args.save_dir = str(root)
    for callback in _entries(config.trainer.get("callbacks")):
        if "dirpath" in callback.init_args and callback.init_args.dirpath is None and _is_checkpoint(callback.class_path):
            callback.init_args.dirpath = str(Path(root) / "checkpoints")


def _resolve_last(config: Any, subcommand: str) -> str | None:
    """``--ckpt_path last`` as Lightning reads it: the newest ``last*.ckpt`` in the recipe's checkpoint folders. A
    fit without one starts a new run (Lightning's "set it and forget it": one job script for the first start and
    every restart); validate / test / predict without one fail rather than score untrained weights."""
    folders = _checkpoint_folders(config)
    found = newest_last_checkpoint(folders)
    if found is not None:
        rank_zero_info(f"{subcommand}: --ckpt_path last is {found}")
        return str(found)
    if subcommand != "fit":
        raise CheckpointError(
            f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, folders))} (the recipe's checkpoint folders): "
            "nothing to load; pass the checkpoint file"
        )
    rank_zero_info(f"fit: --ckpt_path last found no last*.ckpt in {', '.join(map(str, folders))}: a new run")
    return None


def _checkpoint_folders(config: Any) -> list[Path]:
    """Where the recipe's checkpoint callbacks save, read from its config before anything is built: a ``dirpath``,
    else ``<default_root_dir>/checkpoints`` (``_follow_root``; also Lightning's own callback when the recipe has
    none)."""
    root = Path(config.trainer.get("default_root_dir") or ".")
    callbacks = [entry for entry in _entries(config.trainer.get("callbacks")) if _is_checkpoint(entry.class_path)]
    folders = [Path(entry.init_args.get("dirpath") or root / "checkpoints") for entry in callbacks]
    return list(dict.fromkeys(folders)) or [root / "checkpoints"]


def _entries(value: Any) -> list[Any]:
    """The ``{class_path, init_args}`` entries of a trainer setting that holds one or a list of them."""
    entries = value if isinstance(value, list) else [value]
    return [entry for entry in entries if hasattr(entry, "get") and entry.get("init_args") is not None]


def _check_writable(directory: str | Path, what: str, lost: str, fix: str) -> None:
    """An OSError naming a folder fit cannot write (a read-only or immutable folder, a file in its place), found
    before the first step: Lightning finds a checkpoint folder's at the first save, a logger's in setup or its first
    log. ``what`` names the folder, ``lost`` what would be, ``fix`` the setting to change. Remote folders are left to
    Lightning."""
    if "://" in str(directory):
        return
    problem = unwritable_reason(directory)
    if problem is not None:
        raise OSError(f"{what} {directory}: {problem}; {lost}: give a folder it can write ({fix})")


def _logger_setting(config: Any, index: int) -> str:
    """How to change the ``index``-th logger's folder: a flag, or for a list of loggers (no flag reaches one entry)
    the recipe's entry."""
    value = config.trainer.get("logger")
    if isinstance(value, list):
        return f"the init_args.save_dir of entry {index} of the recipe's trainer.logger list"
    if hasattr(value, "get") and value.get("init_args") is not None:
        return "--trainer.logger.init_args.save_dir"
    return "--trainer.default_root_dir"  # Lightning's own logger (logger: true) writes into the root


def _is_checkpoint(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    found = getattr(importlib.import_module(module), name, None) if module else None
    return isinstance(found, type) and issubclass(found, ModelCheckpoint)


def _own_directory(config: Any, subcommand: str) -> None:
    """Point the trainer's root and its loggers' save_dir at a directory of this run's own: the root itself
    when it is new or empty, else a new ``<root>/<subcommand>/<time>``.

    The name is chosen once and kept in the environment, so the processes a strategy launches from this one
    (which parse the same command line again) write into the same directory."""
    directory = os.environ.get(RUN_DIRECTORY_VARIABLE) if _launched() else None
    if directory is None:
        root = Path(config.trainer.get("default_root_dir") or ".")
        if _claim_if_empty(root):
            directory = str(root)
            _claimed.append((root, False))
        else:
            directory = str(new_directory(root / subcommand))
            _claimed.append((Path(directory), True))
        os.environ[RUN_DIRECTORY_VARIABLE] = directory
    config.trainer.default_root_dir = directory
    for logger in _entries(config.trainer.get("logger")):
        if "save_dir" in logger.init_args:
            logger.init_args.save_dir = directory


CLAIM_FILE = ".adaptive-mllm-run"  # marks a run directory as taken, so two evaluations started together never share it
FIT_LOCK = ".adaptive-mllm-fit.lock"  # held (flock) by the fit running in a root
RUN_MARKERS = (CLAIM_FILE, FIT_LOCK)  # what a run leaves in a directory that is not yet a record of it
REPLACED = "replaced"  # where --overwrite_run sets an earlier run aside: <root>/replaced/<time>/
_claimed: list[tuple[Path, bool]] = []  # this command's run directory, and whether it made it (a new <sub>/<time>)


def _release_unused_claims() -> None:
    """A run that failed before writing anything (a refused flag, a bad data file) gives its directory back: its
    claim goes, and a ``<subcommand>/<time>`` directory it made goes too, so the corrected rerun writes where the
    first was meant to. A directory holding anything else (a saved config, answers) is the failed run's record, kept."""
    for directory, made in _claimed:
        entries = list(directory.iterdir()) if directory.is_dir() else []
        if any(entry.name not in RUN_MARKERS for entry in entries):
            continue
        (directory / CLAIM_FILE).unlink(missing_ok=True)
        if made:
            directory.rmdir()


def _claim_if_empty(root: Path) -> bool:
    """Take ``root`` for this run when it is new or empty. The claim is an exclusively created file: of two
    runs that both found it empty, one gets it, the other a directory of its own."""
    root.mkdir(parents=True, exist_ok=True)
    if any(path.name not in RUN_MARKERS for path in root.iterdir()) or _fit_running_in(root):
        return False
    try:
        os.close(os.open(root / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def _fit_running_in(root: Path) -> bool:
    """Whether a fit holds ``root`` (its lock file is there and held): it may not have written anything yet."""
    if not (root / FIT_LOCK).exists():
        return False
    lock = DirectoryLock(root, FIT_LOCK)
    try:
        return not lock.try_exclusive()
    except OSError:
        return False  # a folder this process cannot write: it claims nothing there either
    finally:
        lock.release()


# What a run leaves in its directory: its configs and report, and what evaluations of its checkpoints and its
# loggers wrote there (subcommands' <subcommand>/<time>/ directories, W&B and CSV logs). Other entries are not
# the run's and stay.
RUN_FILES = ("config.yaml", "config-resumed-*.yaml", *REPORT_FILES, "earlier-tests", CLAIM_FILE,
             "test", "predict", "validate", "wandb", "lightning_logs")


def set_aside_run(run_dir: Path, checkpoint_dirs: list[Path], log_dirs: Iterable[Path] = ()) -> Path:
    """Move a run's own files (configs, test report, answers, the evaluations of its checkpoints, its W&B and CSV
    logs) and its checkpoints into a new ``run_dir/replaced/<time>/``: a fit told to replace a run must not resume
    from, or mix with, the old run (``last.ckpt`` would stay the old run's, ``wandb sync`` would upload both), and
    nothing is deleted unasked. ``log_dirs``: the folders of loggers that make a ``version_<n>`` folder per run
    inside ``run_dir`` (their versions go too, so the new run's logs start again at ``version_0``)."""
    keep = new_directory(run_dir / REPLACED)
    for path in sorted({path for pattern in RUN_FILES for path in run_dir.glob(pattern)}):
        path.rename(keep / path.name)
    for index, directory in enumerate(checkpoint_dirs):
        checkpoints = sorted(directory.glob("*.ckpt")) if directory.is_dir() else []
        if checkpoints:
            target = keep / ("checkpoints" if index == 0 else f"checkpoints-{index}")
            target.mkdir()
            for path in checkpoints:  # a file, or a sharded checkpoint's directory; a checkpoint folder may lie on
                shutil.move(path, target / path.name)  # another filesystem than the run (rename fails across them)
    for folder in log_dirs:
        versions = sorted(folder.glob("version_*")) if folder.resolve() == run_dir.resolve() else [folder]
        for path in (path for path in versions if path.is_dir()):  # not gone with RUN_FILES (lightning_logs)
            target = keep / path.resolve().relative_to(run_dir.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    return keep


def _earlier_run(trainer: Any) -> Path | None:
    """A file of an earlier run where this fit would write its own, or None: a ``config.yaml`` in the root or the
    first logger's folder, in any ``version_<n>`` folder of a logger that makes a new one per run inside the root
    (Lightning's CSVLogger / TensorBoardLogger, ``--trainer.logger=true``: the logger's own folder is new every
    time, so it never holds the earlier config itself), or a checkpoint in a folder of this fit's checkpoint
    callbacks (where the new run's ``last.ckpt`` would land beside the old one's)."""
    root = Path(trainer.default_root_dir)
    candidates = [root / "config.yaml"]
    if trainer.loggers and not _is_versioned(trainer.loggers[0]) and trainer.loggers[0].save_dir:
        candidates.append(Path(trainer.loggers[0].save_dir) / "config.yaml")  # where SaveConfigCallback writes
    for folder in _versioned_log_dirs(trainer):
        candidates += sorted(folder.glob("*/config.yaml"))
    for directory in _checkpoint_dirs(trainer):
        candidates += sorted(directory.glob("*.ckpt")) if directory.is_dir() else []
    return next((path for path in candidates if path.exists()), None)


def _is_versioned(logger: Any) -> bool:
    """A logger that writes each run into a new ``<save_dir>/<name>/version_<n>`` (as ``trainer.log_dir`` tells them)."""
    return isinstance(logger, (TensorBoardLogger, CSVLogger))


def _versioned_log_dirs(trainer: Any) -> list[Path]:
    """The ``<save_dir>/<name>`` folders of the versioned loggers that lie inside the root. One outside it (a
    ``save_dir`` that several runs share) is left alone: its versions keep those runs apart."""
    root = Path(trainer.default_root_dir).resolve()
    folders = [Path(logger.root_dir) for logger in trainer.loggers if _is_versioned(logger)]  # no version is drawn
    return [folder for folder in folders if folder.resolve().is_relative_to(root)]


def _checkpoint_dirs(trainer: Any) -> list[Path]:
    """Where this fit's checkpoint callbacks save on this machine: their ``dirpath``, or ``<root>/checkpoints`` where
    Lightning decides at setup (there when no logger is set; inside a logger's folder, new per run, otherwise).
    Remote folders (``s3://...``; ``Path`` would make ``s3:/...`` of them, a local path) are left to Lightning."""
    folders = [callback.dirpath or f"{trainer.default_root_dir}/checkpoints" for callback in trainer.checkpoint_callbacks]
    return [Path(folder) for folder in map(str, folders) if "://" not in folder]


def _own_checkpoint(ckpt_path: str | Path, trainer: Any) -> bool:
    """Whether ``ckpt_path`` is one of this root's run (under the root, a checkpoint folder of this fit, or a
    versioned logger's folder; not in a run ``--overwrite_run`` set aside there): resuming it continues that run,
    anything else would be a second run mixed in."""
    if "://" in str(ckpt_path) or _set_aside_run_of(ckpt_path, Path(trainer.default_root_dir)) is not None:
        return False
    path = Path(ckpt_path).resolve()
    places = [Path(trainer.default_root_dir), *_checkpoint_dirs(trainer), *_versioned_log_dirs(trainer)]
    return any(path.is_relative_to(place.resolve()) for place in places)


def _set_aside_run_of(ckpt_path: str | Path | None, root: Path) -> Path | None:
    """The ``<root>/replaced/<time>`` folder (a run ``--overwrite_run`` set aside) that holds ``ckpt_path``, or None."""
    if not ckpt_path or "://" in str(ckpt_path):
        return None
    replaced = (root / REPLACED).resolve()
    path = Path(ckpt_path).resolve()
    if not path.is_relative_to(replaced) or path == replaced:
        return None
    return root / REPLACED / path.relative_to(replaced).parts[0]


def _place(path: Path, root: Path) -> Path:
    """The root when ``path`` is in it, else the folder holding ``path`` (a checkpoint folder placed elsewhere)."""
    return root if path.resolve().is_relative_to(root.resolve()) else path.parent


def _launched() -> bool:
    """Whether this process was launched by a strategy (a rank other than 0 of the command the user ran)."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK"))


def _has_test_split(datamodule: Any) -> bool:
    """False only for a datamodule that says it has no test records (LLaVA JSON without ``test_json``)."""
    paths = getattr(datamodule, "json_paths", None)
    return not isinstance(paths, dict) or paths.get("test") is not None
