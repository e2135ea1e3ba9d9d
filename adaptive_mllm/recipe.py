"""Recipes: the LightningCLI over AdaptiveMLLM that reads a YAML recipe (and flags) into a model,
a datamodule and a trainer.

It sits below the subcommands: ``cli`` runs it for fit / validate / test / predict, and
``benchmark`` and ``export`` build their model through it (``run=False``).

The parts' packages are imported here so that short class names resolve, e.g.
``--model.scheduler=LayerScheduler`` or ``--data=ShapesVQADataModule``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import adaptive_mllm.backbones  # noqa: F401  (short class names in configs)
import adaptive_mllm.data  # noqa: F401
import adaptive_mllm.schedulers  # noqa: F401
import adaptive_mllm.token_selection  # noqa: F401
from adaptive_mllm.module import AdaptiveMLLM


class SaveConfigToWandb(SaveConfigCallback):
    """Writes config.yaml beside the run (overwriting, so a second run never aborts on it) and pushes the
    resolved config to W&B."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class AdaptiveMLLMCLI(LightningCLI):
    """LightningCLI plus ``--test_after_fit``: the test split is scored at every budget when ``fit`` ends."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run `test` on the trained weights after fit")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: list[str] | None = None, run: bool = True) -> AdaptiveMLLMCLI:
    """The recipe's CLI; ``run=False`` only builds the model, datamodule and trainer from ``args``."""
    return AdaptiveMLLMCLI(
        AdaptiveMLLM,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToWandb,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
    )
