"""`predict`'s answers, kept: JSON lines per budget in a directory of the run's own, and a W&B table.

Lightning's ``predict`` returns the answers to the caller and drops them from the command line; this callback
writes every row as it is made (a crash keeps what was answered), never into another run's directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

COLUMNS = ("id", "question", "answer", "budget", "units", "flops_fraction")


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s rows to ``<output_dir>/budget-<b>.jsonl`` (``.rank<r>`` added under several processes).

    Args:
        output_dir: where the answers go; it must not hold answers already. Default: a new
            ``<default_root_dir>/predictions/<date>-<time>`` directory.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.directory: Path | None = None
        self._files: dict[float, IO[str]] = {}
        self._rows: list[dict[str, Any]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "predict":
            return
        directory = None
        if trainer.is_global_zero:  # one name for all processes, chosen once
            directory = Path(self.output_dir) if self.output_dir else _new_directory(Path(trainer.default_root_dir) / "predictions")
            if any(directory.glob("budget-*.jsonl")):
                raise FileExistsError(f"PredictionWriter.output_dir={directory} already holds answers; choose a new directory")
        directory = Path(trainer.strategy.broadcast(str(directory), src=0))
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._rows = []

    def write_on_batch_end(
        self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        for row in prediction:
            line = {column: row.get(column) for column in COLUMNS}
            handle = self._file(float(row["budget"]), trainer)
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            self._rows.append(line)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}
        if self.directory is None:
            return
        rank_zero_info(f"predict: {len(self._rows)} answers written to {self.directory}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                data = [[row[column] for column in COLUMNS] for row in self._rows]
                logger.log_table(key="predict/answers", columns=list(COLUMNS), data=data)

    def _file(self, budget: float, trainer: Any) -> IO[str]:
        if budget not in self._files:
            rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            assert self.directory is not None, "setup('predict') runs before the first batch"
            self._files[budget] = open(self.directory / f"budget-{budget:g}{rank}.jsonl", "a", encoding="utf-8")
        return self._files[budget]


def _new_directory(parent: Path) -> Path:
    """A new directory no other run has taken: the time, then a counter if two runs start in one second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for counter in range(1, 1000):
        candidate = parent / (stamp if counter == 1 else f"{stamp}-{counter}")
        try:
            candidate.mkdir()  # atomic: of two runs starting together, one gets each name
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free directory name under {parent} for {stamp}")
