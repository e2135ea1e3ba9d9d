"""`predict`'s answers, kept: JSON lines per budget in a directory of the run's own, and a W&B table.

Lightning's ``predict`` returns the answers to the caller and drops them from the command line; this callback
writes every row as it is made (a crash keeps what was answered, marked incomplete), never into another run's
directory. It also stops ``predict`` on SIGTERM, after the batch it is in: Lightning's prediction loop, unlike its
fit and evaluation loops, never looks at the signal.

:class:`IncompleteMark` is the ``INCOMPLETE`` file that says a directory's answers are partial, and why; ``test``'s
answers (:class:`adaptive_mllm.callbacks.SweepReport`) use it too.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from itertools import zip_longest
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm.data.benchmarks.submission import write_submission
from adaptive_mllm.reporting import write_failure, write_text_durably

COLUMNS = ("id", "question", "answer", "budget", "units", "flops_fraction")
INCOMPLETE = "INCOMPLETE"  # present while predict (or test) writes answers, and after it failed or was stopped
DONE = "predict_done.json"  # written once every answer is in budget-<b>.jsonl (and every submission file written)


def stop_reason(exception: BaseException) -> str:
    """What stopped a command, in words: the signal for the ways a user stops one, else the error."""
    if isinstance(exception, SIGTERMException):  # Lightning's, raised between two batches after a SIGTERM
        return "SIGTERM"
    if isinstance(exception, KeyboardInterrupt):
        return "KeyboardInterrupt (Ctrl+C, SIGINT)"
    return f"{type(exception).__name__}: {exception}"


class IncompleteMark:
    """The file ``INCOMPLETE`` in a directory that a command fills with answers: there from before its first answer
    until the last one (and its report) is written, and left, saying what stopped the command, when it stops early;
    the answers written before are kept beside it. ``kill -9`` leaves the note it started with.

    Args:
        directory: where the answers are written.
        command: the command writing them ("predict", "test"), named in the note.
        answers: the files that hold the answers, as the note names them ("the budget-*.jsonl files").
    """

    def __init__(self, directory: Path, command: str, answers: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / INCOMPLETE
        self.command = command
        self.answers = answers

    def _running(self) -> str:
        return f"{self.command} is running, or stopped before every answer was written\n"

    def claim(self) -> None:
        """Create the file exclusively: of two runs started together into one directory, one writes and the other
        stops (FileExistsError) instead of both appending to the same files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "x", encoding="utf-8") as handle:
                handle.write(self._running())
        except FileExistsError:
            raise FileExistsError(
                f"{self.path} exists: another {self.command} is writing into {self.directory}, or one stopped there before "
                "its answers were written (the file says why); choose a new directory, or delete that file to reuse this one"
            ) from None

    def start(self) -> None:
        """Create (or replace) the file, for a directory this run holds already."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self._running(), encoding="utf-8")

    def stopped(self, exception: BaseException, unfinished: str | None = None) -> None:
        """Say what stopped the command, and warn that its answers are partial. ``unfinished``: where every answer was
        written but a file made from them was not (``predict``'s submission files), what was left undone, said in
        place of "partial". Never raises: on a full disk the note may not be written (the file stays, with the note it
        had or empty), and the warning says so; the command's own error goes on."""
        reason = stop_reason(exception)
        if unfinished is None:
            note = f"{self.answers} here hold only part of the answers: those written before it stopped, kept"
            state = f"the answers in {self.directory} are incomplete"
        else:
            note = f"{self.answers} here hold every answer, but {unfinished}"
            state = f"the answers in {self.directory} are complete, but {unfinished}"
        try:  # in place, not beside and renamed: truncating frees the old note's space for the new one
            self.path.write_text(f"{self.command} stopped by {reason}\n{note}\n", encoding="utf-8")
            unwritten = ""
        except OSError as error:
            unwritten = f"; the note in {self.path} could not be updated ({error.strerror or error})"
        rank_zero_warn(f"{self.command} stopped by {reason}: {state} (see {INCOMPLETE} there){unwritten}")

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s rows to ``<output_dir>/budget-<b>.jsonl``.

    Under several processes each writes ``budget-<b>.rank<r>.jsonl``; at the end of ``predict`` process 0
    merges them (each id once, in the dataset's order) into ``budget-<b>.jsonl`` and removes them. The
    submission files (VQAv2, MMBench) are written from all the answers, each whole or not at all (a temporary file
    renamed over its name). A file ``INCOMPLETE`` lies in the directory from the start until every answer and
    submission file is written; then ``predict_done.json`` (the answer count per budget) replaces it. A failed,
    interrupted or killed ``predict`` leaves ``INCOMPLETE`` (with the error or signal where there was one) beside its
    partial answers, or beside all of them where a submission file failed. An error writing a file names it, and
    says where the disk is full. On SIGTERM ``predict`` stops after the batch it is in
    (Lightning's ``SIGTERMException``: the command exits 143, as ``fit`` and ``test`` do); under several processes
    all stop together when any of them is signalled.

    Args:
        output_dir: where the answers go; it must not hold answers already. Default: the trainer's
            ``default_root_dir`` (``predict`` gives each run its own), or a new ``predictions/<time>`` below it
            if that holds answers already.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.directory: Path | None = None
        self._files: dict[float, IO[str]] = {}
        self._rows: list[dict[str, Any]] = []
        self._skipped = 0  # records skipped as bad (skip_bad_records) on this process
        self._left: str | None = None  # once every answer is in budget-<b>.jsonl (process 0): what is left to write
        self._complete = False  # and every submission file and predict_done.json: nothing left to mark
        self._mark: IncompleteMark | None = None
        self._others_answering = True  # another process may have a batch left (``_sigterm_round``)
        self._signalled = False  # this process got SIGTERM (several processes: ``on_predict_start``)
        self._earlier_handler: Any = None  # SIGTERM's handler before Lightning's

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "predict":
            return
        self._earlier_handler = signal.getsignal(signal.SIGTERM)  # setup runs before Lightning sets its own
        directory = None
        if trainer.is_global_zero:  # one name for all processes, chosen once
            directory = Path(self.output_dir or trainer.default_root_dir)
            if not self.output_dir and _holds_answers(directory):
                directory = new_directory(directory / "predictions")
            if _holds_answers(directory):
                raise FileExistsError(f"PredictionWriter.output_dir={directory} already holds answers; choose a new directory")
            IncompleteMark(directory, "predict", "the budget-*.jsonl files").claim()
            (directory / DONE).unlink(missing_ok=True)
        directory = Path(trainer.strategy.broadcast(str(directory), src=0))
        directory.mkdir(parents=True, exist_ok=True)  # on every node
        self.directory = directory
        self._mark = IncompleteMark(directory, "predict", "the budget-*.jsonl files")
        self._rows = []
        self._skipped = 0
        self._left = None
        self._complete = False
        self._others_answering = True  # until a stop round says none is

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Several processes: Lightning's SIGTERM handler is replaced by one that only notes the signal (and passes it
        on, as Lightning's does, to the processes this one launched and to the handler from before). Lightning's
        also broadcasts from process 0, inside the handler: a collective the processes not signalled never join, so
        the signalled one blocks there. The stop rounds carry the signal instead."""
        self._signalled = False
        if trainer.world_size == 1 or threading.current_thread() is not threading.main_thread():
            return
        launcher, earlier = trainer.strategy.launcher, self._earlier_handler

        def note(signum: int, frame: Any) -> None:
            if not self._signalled and launcher is not None:
                launcher.kill(signum)
            self._signalled = True
            if callable(earlier):
                earlier(signum, frame)

        signal.signal(signal.SIGTERM, note)  # Lightning's teardown puts back the handler from before it

    def write_on_batch_end(
        self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        self._skipped += int(batch.get("num_skipped", 0)) if isinstance(batch, dict) else 0
        for row in prediction:
            line = {column: row.get(column) for column in COLUMNS}
            handle = self._file(float(row["budget"]), trainer)
            try:
                handle.write(json.dumps(line) + "\n")
                handle.flush()
            except OSError as error:  # on a full disk a bare "[Errno 28] No space left on device": name the file
                raise write_failure(handle.name, error) from error
            self._rows.append(line)
        # Stop on SIGTERM once this batch's answers are on disk, as Lightning's evaluation loop does for test (its
        # prediction loop never checks). After the last batch every answer is in: finish.
        last = trainer.predict_loop.batch_progress.is_last_batch
        if trainer.world_size == 1:
            if trainer.received_sigterm and not last:
                raise SIGTERMException()
        elif self._sigterm_round(trainer, answering=not last):
            raise SIGTERMException()

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        while trainer.world_size > 1 and self._others_answering:  # this process's batches are done, others' not
            if self._sigterm_round(trainer, answering=False):
                raise SIGTERMException()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        if self.directory is None:
            return
        trainer.strategy.barrier("PredictionWriter.on_predict_end")  # every process's rows are on disk
        skipped = int(trainer.strategy.reduce(torch.tensor(float(self._skipped), device=pl_module.device), reduce_op="sum"))
        if not trainer.is_global_zero:
            return
        rows = self._merge() if trainer.world_size > 1 else self._rows
        counts = {f"{budget:g}": sum(row["budget"] == budget for row in rows) for budget in _budgets(rows)}
        summary = ", ".join(f"{count} at budget {budget}" for budget, count in counts.items()) or "none"
        unanswered = f"; {skipped} records skipped as bad have none (see the warnings)" if skipped else ""
        rank_zero_info(f"predict: {len(rows)} answers ({summary}) written to {self.directory}{unanswered}")
        # the submission files before the run is said done: one that fails (a full disk) leaves INCOMPLETE, saying so
        self._left = "not every submission file (submission-budget-*) was written; those here are whole"
        self._write_submissions(trainer, rows)
        self._left = f"{DONE} was not written"
        done = {"answers": counts, "total": len(rows), "skipped_records": skipped, "processes": trainer.world_size,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_text_durably(self.directory / DONE, json.dumps(done, indent=2) + "\n")
        if self._mark is not None:
            self._mark.finished()
        self._complete = True
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [[row[column] for column in COLUMNS] for row in rows]
                logger.log_table(key="predict/answers", columns=list(COLUMNS), data=data)

    def _sigterm_round(self, trainer: Any, answering: bool) -> bool:
        """Whether every process stops now: one collective per batch, on every process (those done with their batches
        join from ``on_predict_epoch_end`` until none answers). Under torchrun or SLURM the signal may reach only some
        processes; one stopping alone would leave the others blocked in a later collective. Lightning's predict
        sampler gives the processes one batch more or fewer, so the rounds go on while any process has a batch left:
        stop when one was signalled and one has (after the last batch every answer is in)."""
        here = torch.tensor([float(trainer.received_sigterm or self._signalled), float(answering)], device=trainer.strategy.root_device)
        signalled, answering_now = trainer.strategy.reduce(here, reduce_op="sum").tolist()
        self._others_answering = answering_now > 0
        return signalled > 0 and answering_now > 0

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Mark the answers partial, saying why. Never raises (Lightning would skip its teardown, and the error that
        stopped predict would be hidden): on a full disk closing the answer files fails again, as their last flush
        does, and the note is written all the same."""
        try:
            self._close()
        except OSError as error:
            rank_zero_warn(f"predict: closing the answer files failed, their last line may be cut short: {error}")
        if self.directory is None or self._mark is None or self._complete or not trainer.is_global_zero:
            return
        self._mark.stopped(exception, self._left)
        try:
            (self.directory / DONE).unlink(missing_ok=True)
        except OSError:  # never raise here (the directory gone, say); INCOMPLETE says the answers are not whole
            pass

    def _merge(self) -> list[dict[str, Any]]:
        """Process 0, several processes: each budget's rank files into ``budget-<b>.jsonl``, each id once.

        Lightning's distributed predict sampler gives process r the questions r, r + n, r + 2n, ... (none
        twice): taking the files' lines in turn restores the dataset's order."""
        assert self.directory is not None
        by_budget: dict[str, list[Path]] = {}
        for path in self.directory.glob("budget-*.rank*.jsonl"):
            budget, _, rank = path.name[: -len(".jsonl")].rpartition(".rank")
            if rank.isdigit():
                by_budget.setdefault(budget, []).append(path)
        rows: list[dict[str, Any]] = []
        for budget, paths in sorted(by_budget.items()):
            paths.sort(key=lambda path: int(path.name[: -len(".jsonl")].rpartition(".rank")[2]))
            per_rank = [[json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] for path in paths]
            merged, seen, repeated = [], set(), 0
            for group in zip_longest(*per_rank):
                for row in group:
                    if row is None:
                        continue
                    if row["id"] in seen:
                        repeated += 1
                        continue
                    seen.add(row["id"])
                    merged.append(row)
            write_text_durably(self.directory / f"{budget}.jsonl", "".join(json.dumps(row) + "\n" for row in merged))
            for path in paths:
                path.unlink()
            if repeated:
                rank_zero_warn(f"predict: {repeated} repeated answers in the {budget} files of {len(paths)} processes dropped")
            rows.extend(merged)
        return rows

    def _write_submissions(self, trainer: Any, rows: list[dict[str, Any]]) -> None:
        """For a benchmark scored by its server (VQAv2 test-dev, MMBench test), the file it takes, per budget."""
        for budget in _budgets(rows):
            answers = {row["id"]: row["answer"] for row in rows if row["budget"] == budget}
            path = write_submission(getattr(trainer, "datamodule", None), self.directory / f"submission-budget-{budget:g}", answers)
            if path is not None:
                rank_zero_info(f"predict: the server's submission file for budget {budget:g} is {path}")

    def _close(self) -> None:
        """Close every answer file, each even where one fails (a full disk: the last flush fails again); then raise the
        first failure, naming its file."""
        failed: tuple[str, OSError] | None = None
        for handle in self._files.values():
            try:
                handle.close()
            except OSError as error:
                failed = failed or (handle.name, error)
        self._files = {}
        if failed is not None:
            raise write_failure(*failed) from failed[1]

    def _file(self, budget: float, trainer: Any) -> IO[str]:
        if budget not in self._files:
            rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            assert self.directory is not None, "setup('predict') runs before the first batch"
            path = self.directory / f"budget-{budget:g}{rank}.jsonl"
            try:
                self._files[budget] = open(path, "a", encoding="utf-8")
            except OSError as error:
                raise write_failure(path, error) from error
        return self._files[budget]


def _budgets(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({row["budget"] for row in rows}, reverse=True)


def _holds_answers(directory: Path) -> bool:
    return any(directory.glob("budget-*.jsonl"))


def new_directory(parent: Path) -> Path:
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
