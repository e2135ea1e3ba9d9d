"""Experiment tracking that never stops training: W&B falls back to an offline run when it cannot go online.

Lightning's WandbLogger stops a run when W&B is set online without an API key, and blocks about 90 s before
crashing when the host is unreachable. Training is worth more than live charts: this logger checks for a key and
for the host (a short TCP connect) before W&B starts, and if either is missing, or W&B still fails to start,
it warns and records offline instead (``wandb sync`` uploads the run later).
"""

from __future__ import annotations

import netrc
import os
import socket
import warnings
from typing import Any
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from adaptive_mllm.checkpoints import peek_checkpoint

DEFAULT_BASE_URL = "https://api.wandb.ai"
WANDB_RUN_KEY = "wandb_run_id"  # in a checkpoint: the W&B run that logged the fit, continued when it resumes


class ResilientWandbLogger(WandbLogger):
    """Lightning's WandbLogger, online when W&B is reachable and offline (with a warning) when it is not.

    Args:
        connect_timeout: seconds the reachability check may wait for the W&B host.
        *args, **kwargs: those of ``lightning.pytorch.loggers.WandbLogger``.
    """

    def __init__(self, *args: Any, connect_timeout: float = 3.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and not self._offline:
            problem = online_problem(self.connect_timeout)
            if problem is not None:
                self._go_offline(problem)
        start = WandbLogger.experiment.fget.__wrapped__  # the undecorated property body: this is rank zero
        try:
            return start(self)
        except Exception as error:  # W&B raises its own errors, and timeouts, from deep inside its service
            if self._wandb_init.get("resume"):  # e.g. "run ID is in use": a new run rather than no training
                warnings.warn(f"could not continue W&B run {self._wandb_init['id']} ({type(error).__name__}: {error}); "
                              "starting a new run", stacklevel=2)  # fmt: skip
                self._wandb_init.pop("id")
                self._wandb_init.pop("resume")
                self._id = None
                return self.experiment
            if self._offline:
                raise
            self._go_offline(f"W&B failed to start online ({type(error).__name__}: {error})")
            return start(self)

    def _go_offline(self, reason: str) -> None:
        warnings.warn(f"{reason}; tracking this run offline instead (upload it later with `wandb sync`)", stacklevel=3)
        import wandb

        if wandb.run is not None:  # a half-started online run would be reused by the next init
            wandb.finish(exit_code=1)
        self._offline = True
        self._wandb_init["mode"] = "offline"
        self._experiment = None


def online_problem(timeout: float = 3.0) -> str | None:
    """Why W&B cannot log online from here, or None if it should. Reads only the environment and ~/.netrc."""
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "dryrun", "disabled"}:
        return None  # W&B will not go online anyway
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    parsed = urlparse(base_url)
    host = parsed.hostname or ""
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return f"no W&B API key (WANDB_API_KEY or `wandb login`) for {base_url}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"the W&B host {base_url} is unreachable ({error})"
    return None


def _netrc_has(host: str) -> bool:
    path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbRunRecord(L.Callback):
    """Records the W&B run id in every checkpoint, so that a fit resumed from one logs into the same W&B run
    (:func:`continue_wandb_run`) instead of starting an unlinked one with half the history."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                checkpoint[WANDB_RUN_KEY] = logger.version


def recorded_wandb_run(ckpt_path: str | os.PathLike) -> str | None:
    """The W&B run id a checkpoint recorded (None: none recorded, or a path that is not a local file / sharded
    directory)."""
    checkpoint = peek_checkpoint(ckpt_path)
    return checkpoint.get(WANDB_RUN_KEY) if isinstance(checkpoint, dict) else None


def continue_wandb_run(logger: ResilientWandbLogger, run_id: str) -> None:
    """Make ``logger`` (not started yet) log into W&B run ``run_id``, created if W&B does not have it (a new
    run, with a warning, if W&B refuses)."""
    logger._wandb_init.update(id=run_id, resume="allow")
