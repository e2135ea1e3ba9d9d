"""SweepReport: what validation and test measure at every budget, and the test sweep's report.

The LightningModule answers every question at every budget (its validation / test steps return those
answers with their FLOPs fraction, units, times and plan); this callback, listed in the recipes,
scores them with the datamodule's metric, sums the budget sweep's statistics (:mod:`adaptive_mllm.sweep`),
logs both per budget, and after ``test`` writes the report: a table (terminal, Markdown, CSV, W&B), the
budget curves and the plan-usage heatmaps (PNG, W&B). The module stays "train and evaluate under
budgets", as torchgeo keeps its tasks thin.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric

from adaptive_mllm.checkpoints import every_process
from adaptive_mllm.metrics import REPORT_COLUMNS, UNPARSABLE, GroupedExactMatch, MMEScore
from adaptive_mllm.plots import plot_budget_curves, plot_group_usage, plot_layer_usage, save
from adaptive_mllm.prediction_writer import INCOMPLETE, IncompleteMark, new_directory
from adaptive_mllm.reporting import format_table, print_table, write_text_durably
from adaptive_mllm.sweep import BudgetStats, BudgetSweep, group_fractions, summary_row, usage_fractions
from adaptive_mllm.test_answers import TestAnswerLog, answers_path

OVERALL = "overall"
MEASURED = ("flops_fraction", "flops_vs_plain", "units", "prefill_ms", "decode_ms_per_token")


class SweepReport(L.Callback):
    """Scores and statistics of every budget of validation / test, logged as ``<stage>/score/<name>/budget_<b>``
    and ``<stage>/<measure>/budget_<b>``; after test, ``test_results.{md,csv}``, ``budget_curves.png``,
    ``layer_usage.png`` and, for head-level plans, ``group_usage.png`` in the log directory, beside every
    answer of the test (``test_answers.jsonl``: :mod:`adaptive_mllm.test_answers`).

    As ``predict`` does (:class:`adaptive_mllm.prediction_writer.IncompleteMark`), a file ``INCOMPLETE`` lies beside
    the answers from before the first one is written until the report is; a test that fails or is stopped (Ctrl+C,
    SIGTERM) leaves it, with the reason, beside the answers written so far."""

    def __init__(self) -> None:
        self._metrics: dict[tuple[str, float], Metric] = {}
        self._sweeps: dict[str, BudgetSweep] = {}
        self._answers: TestAnswerLog | None = None
        self._log_dir: Path | None = None  # found on every process at test start (trainer.log_dir is a collective)
        self._repeated: dict[str, frozenset[Any]] = {}  # stage -> ids this process answers only as padding
        self._skipped = 0  # test records skipped as bad (skip_bad_records) on this process
        self._scored: set[Any] = set()  # ids of the test questions this process scored
        self._incomplete: IncompleteMark | None = None  # process 0's, from test start until the report is written

    def metric(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, budget: float) -> Metric:
        """The datamodule's metric for ``stage`` (exact match per question kind, or a benchmark's own), one per budget."""
        key = (stage, budget)
        if key not in self._metrics:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "make_metric"):
                metric = datamodule.make_metric(stage)
            else:
                metric = GroupedExactMatch()
            self._metrics[key] = metric.to(pl_module.device)
        return self._metrics[key]

    # --- per batch -------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._repeated["val"] = repeated_ids(trainer.val_dataloaders, trainer.global_rank, trainer.world_size)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        outputs, batch = self._without_repeats("val", outputs, batch)
        self._update(trainer, pl_module, "val", outputs, batch)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = self._log_dir = _log_dir(trainer)
        if trainer.is_global_zero:
            keep_earlier_report(log_dir)  # an earlier test's INCOMPLETE goes with its answers
            self._incomplete = IncompleteMark(log_dir, "test", "the test_answers*.jsonl files")
            self._incomplete.start()
        trainer.strategy.barrier()  # moved before any process starts its answers file
        self._answers = TestAnswerLog(answers_path(log_dir, trainer.global_rank, trainer.world_size))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._repeated["test"] = repeated_ids(trainer.test_dataloaders, trainer.global_rank, trainer.world_size)
        self._skipped, self._scored = 0, set()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._skipped += int(batch.get("num_skipped", 0))
        outputs, batch = self._without_repeats("test", outputs, batch)
        self._update(trainer, pl_module, "test", outputs, batch)
        if outputs:
            self._scored.update(batch["ids"])
        if outputs and self._answers is not None:
            for budget, out in outputs.items():
                metric = self.metric(trainer, pl_module, "test", budget)
                scores = metric.question_scores(out["answers"], batch) if hasattr(metric, "question_scores") else None
                self._answers.write(budget, out, batch, scores)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_answers()
        if self._incomplete is not None:  # every answer and the report written
            self._incomplete.finished()
            self._incomplete = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            self._close_answers()  # what was answered stays on disk, marked as partial
        except OSError as error:  # a full disk: the last flush fails again; the note below is written all the same
            rank_zero_warn(f"test: closing the answer files failed, their last line may be cut short: {error}")
        if self._incomplete is not None:
            self._incomplete.stopped(exception)
            self._incomplete = None

    def _close_answers(self) -> None:
        if self._answers is not None:
            self._answers.close()
            self._answers = None

    def _without_repeats(
        self, stage: str, outputs: dict[float, dict[str, Any]] | None, batch: dict[str, Any]
    ) -> tuple[dict[float, dict[str, Any]] | None, dict[str, Any]]:
        """The batch and its answers without the questions this process got only as padding (scored once,
        by the process that got them first). Padding rows are still generated: a sharded model needs every
        process in every forward."""
        repeated = self._repeated.get(stage)
        if not outputs or not repeated:
            return outputs, batch
        keep = [row for row, question_id in enumerate(batch["ids"]) if question_id not in repeated]
        if len(keep) == len(batch["ids"]):
            return outputs, batch
        if not keep:
            return None, batch
        return {budget: _answer_rows(out, keep) for budget, out in outputs.items()}, _batch_rows(batch, keep)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, outputs: dict[float, dict[str, Any]] | None, batch: dict[str, Any]) -> None:
        """``outputs``: budget -> what ``AdaptiveMLLM.generate`` returned for the batch (None: an empty batch)."""
        if not outputs:
            return
        shape = pl_module.backbone.shape
        sweep = self._sweeps.setdefault(stage, BudgetSweep())
        for budget, out in outputs.items():
            self.metric(trainer, pl_module, stage, budget).update(out["answers"], batch)
            sweep.update(
                budget, list(batch["question_kinds"]), out["flops_fraction"], out["flops_vs_plain"], out["units"], out["prefill_seconds"],
                out["decode_seconds_per_token"], out["plan"], shape.num_layers, shape.num_kv_heads,
            )  # fmt: skip

    # --- per epoch -------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, stats = self._epoch_end(trainer, pl_module, "test")
        # records skipped as bad are said in the report, and the baseline is taken over the questions scored
        skipped = int(trainer.strategy.reduce(torch.tensor(float(self._skipped), device=pl_module.device), reduce_op="sum"))
        scored = set().union(*every_process(sorted(self._scored, key=str))) if skipped else None
        for row in rows:
            row["skipped_records"] = skipped
        if trainer.sanity_checking or not rows or not trainer.is_global_zero:
            return
        self._report(trainer, pl_module, rows, stats, scored)

    def _question_kinds(self, trainer: L.Trainer, stage: str, sweep: BudgetSweep) -> list[str]:
        """The groups usage is reported by: the datamodule's, the same list on every process (DDP sums line
        up); else the kinds this process saw."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "question_kinds"):
            return list(datamodule.question_kinds(stage))
        return sorted({kind for stats in sweep.stats.values() for kind in stats.kind_examples})

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[list[dict[str, Any]], dict[float, BudgetStats]]:
        """One row per budget (scores, FLOPs fraction, units, times), logged, and the usage stats behind them."""
        shape = pl_module.backbone.shape
        sweep = self._sweeps.pop(stage, BudgetSweep())
        stats = sweep.synced(self._question_kinds(trainer, stage, sweep), shape.num_layers, shape.num_kv_heads)
        rows = []
        for budget in pl_module.eval_budgets:
            metric = self.metric(trainer, pl_module, stage, budget)
            scores = metric.compute()
            metric.reset()
            suffix = f"budget_{budget:g}"
            for name, value in scores.items():
                pl_module.log(f"{stage}/score/{name}/{suffix}", value.float(), sync_dist=False)  # already reduced
            row = {"budget": budget, **{name: float(value) for name, value in scores.items()}}
            if budget in stats and stats[budget].examples:
                row["questions"] = int(stats[budget].examples)
                row.update(summary_row(stats[budget]))
                for name in MEASURED:
                    pl_module.log(f"{stage}/{name}/{suffix}", row[name], sync_dist=False)  # summed across processes
            rows.append(row)
        return rows, stats

    # --- the test report -------------------------------------------------------------------------------
    def _report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict[str, Any]], stats: dict[float, BudgetStats],
        scored: set[Any] | None,
    ) -> None:
        """The sweep's table (terminal, Markdown, CSV, W&B), its curves and plan heatmaps (PNG, W&B). ``scored``:
        the ids of the questions scored when some records were skipped (the baseline is taken over those)."""
        metric = self.metric(trainer, pl_module, "test", rows[0]["budget"])
        datamodule = getattr(trainer, "datamodule", None)
        baseline = datamodule.majority_baseline("test", scored) if hasattr(datamodule, "majority_baseline") else {}
        header, table = _score_table(pl_module, metric, rows, baseline)
        print_table(f"test scores ({type(metric).__name__})", header, table)
        log_dir = self._log_dir or _log_dir(trainer)
        log_dir.mkdir(parents=True, exist_ok=True)
        # each whole or not at all (a temporary file renamed over the name): `table` and `plot` read the CSV, and a
        # cut one reads as a run with fewer budgets; an error (a full disk) names the file and leaves INCOMPLETE
        write_text_durably(log_dir / "test_results.md", format_table(header, table) + "\n")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=sorted({k for row in rows for k in row}))
        writer.writeheader()
        writer.writerows(rows)
        write_text_durably(log_dir / "test_results.csv", text.getvalue())
        figures = _figures(pl_module, rows, stats, log_dir, baseline.get(OVERALL))
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table("test/results", columns=header, data=table)
            if hasattr(logger, "log_image"):
                for key, path in figures.items():
                    logger.log_image(key, images=[str(path)])


def _log_dir(trainer: L.Trainer) -> Path:
    """Call on every process: ``trainer.log_dir`` broadcasts rank 0's."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def repeated_ids(dataloaders: Any, rank: int, world_size: int) -> frozenset[Any]:
    """Ids of the questions an evaluation loader gives this process only to even out the processes' shares.

    Lightning's DistributedSampler for validation / test (no shuffling) deals position ``p`` of the index
    list to process ``p % world_size`` and pads the list with its first indices: index ``i < padding`` comes
    again at position ``N + i``. Its first copy sits on process ``i % world_size``, the repeat on
    ``(N + i) % world_size``, never the same one, so on this process those ids are only ever repeats."""
    loader = dataloaders[0] if isinstance(dataloaders, (list, tuple)) and dataloaders else dataloaders
    sampler = getattr(loader, "sampler", None)
    if world_size < 2 or not isinstance(loader, DataLoader) or not isinstance(sampler, DistributedSampler) or sampler.shuffle:
        return frozenset()
    dataset = loader.dataset
    size = len(dataset)
    padding = sampler.total_size - size
    records = getattr(dataset, "records", None)
    if padding <= 0 or sampler.drop_last or records is None:
        return frozenset()
    return frozenset(records[i].id for i in range(min(padding, len(records))) if (size + i) % world_size == rank)


def _batch_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The batch's fields (lists and tensors over its examples) at ``rows``."""
    size = len(batch["ids"])
    index = torch.tensor(rows)
    picked = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            picked[key] = value[index.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            picked[key] = [value[row] for row in rows]
        else:
            picked[key] = value
    return picked


def _answer_rows(out: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """``AdaptiveMLLM.generate``'s output at ``rows``: per-example lists picked, batch means recomputed."""
    picked = dict(out)
    for key in ("answers", "answer_tokens", "flops_fractions", "flops_vs_plain_fractions", "units_per_example"):
        if key in out:
            picked[key] = [out[key][row] for row in rows]
    picked["flops_fraction"] = sum(picked["flops_fractions"]) / len(rows)
    picked["flops_vs_plain"] = sum(picked["flops_vs_plain_fractions"]) / len(rows)
    picked["units"] = sum(picked["units_per_example"]) / len(rows)
    if out.get("plan") is not None:
        picked["plan"] = out["plan"].select(torch.tensor(rows, device=out["plan"].layer_mask.device))
    return picked


REPORT_FILES = ("test_results.md", "test_results.csv", "test_answers*.jsonl", "budget_curves.png", "layer_usage.png", "group_usage.png",
                INCOMPLETE)  # fmt: skip


def keep_earlier_report(log_dir: Path) -> Path | None:
    """Move an earlier test's report out of the way (to ``earlier-tests/<time>/``) instead of overwriting it:
    loggers such as W&B give every run the same directory, and a test's answers are not made again for free."""
    files = [path for pattern in REPORT_FILES for path in sorted(log_dir.glob(pattern))]
    if not files:
        return None
    keep = new_directory(log_dir / "earlier-tests")
    for path in files:
        path.rename(keep / path.name)
    rank_zero_info(f"test: the earlier test report in {log_dir} was moved to {keep}")
    return keep


def _score_table(pl_module: L.LightningModule, metric: Metric, rows: list[dict[str, Any]], baseline: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per budget (and the majority baseline, where the datamodule has one),
    one row per score, then the questions scored (and records skipped as bad), units, FLOPs fraction and times."""
    names = [OVERALL] + sorted(k for k in rows[0] if k not in {*REPORT_COLUMNS, OVERALL})
    header = ["score"] + [f"budget {row['budget']:g}" for row in rows] + (["majority baseline"] if baseline else [])
    pad = [""] if baseline else []
    table = []
    for name in names:
        line = [name] + [_score_cell(metric, name, row.get(name)) for row in rows]
        if baseline:
            line.append(_score_cell(metric, name, baseline.get(name)))
        table.append(line)
    table.append(["questions scored"] + [f"{row.get('questions', 0)}" for row in rows] + pad)
    if rows[0].get("skipped_records"):
        table.append(["records skipped as bad"] + [f"{row['skipped_records']}" for row in rows] + pad)
    if pl_module.scheduler is not None:
        table.append(["units run"] + [f"{row.get('units', float('nan')):.2f}" for row in rows] + pad)
        table.append(["FLOPs fraction"] + [f"{row.get('flops_fraction', float('nan')):.3f}" for row in rows] + pad)
    if pl_module.token_selector is not None:  # the selection's own saving too: against every image token, no selector
        table.append(["FLOPs vs plain model"] + [f"{row.get('flops_vs_plain', float('nan')):.3f}" for row in rows] + pad)
    table.append(["prefill ms / batch"] + [f"{row.get('prefill_ms', float('nan')):.1f}" for row in rows] + pad)
    table.append(["decode ms / token"] + [f"{row.get('decode_ms_per_token', float('nan')):.2f}" for row in rows] + pad)
    return header, table


def _figures(
    pl_module: L.LightningModule, rows: list[dict[str, Any]], stats: dict[float, BudgetStats], log_dir: Path, baseline: float | None
) -> dict[str, Path]:
    """Budget curves and plan heatmaps written to ``log_dir``, by their W&B key."""
    scheduler = pl_module.scheduler
    label = type(scheduler).__name__ if scheduler is not None else "full model"
    if pl_module.token_selector is not None:
        label += f" + {type(pl_module.token_selector).__name__}"
    figures = {"test/budget_curves": save(plot_budget_curves({label: rows}, baseline=baseline), log_dir / "budget_curves.png")}
    usage = {budget: usage_fractions(stats[budget]) for budget in stats if stats[budget].layer_usage}
    if usage:
        prefix = scheduler.num_prefix_layers if scheduler is not None else 0
        figures["test/layer_usage"] = save(plot_layer_usage(usage, prefix), log_dir / "layer_usage.png")
    if scheduler is not None and scheduler.units_per_layer > 1:  # head-level plans
        groups = {budget: group_fractions(stats[budget]) for budget in stats if stats[budget].group_usage}
        figures["test/group_usage"] = save(plot_group_usage(groups), log_dir / "group_usage.png")
    return figures


def _score_cell(metric: Metric, name: str, value: float | None) -> str:
    """Scores as percentages, except counts (unparsable answers) and MME's points."""
    if value is None or value != value:
        return "-"
    if name == UNPARSABLE:
        return f"{int(value)}"
    if isinstance(metric, MMEScore) and not name.endswith(("/acc", "/acc_plus")):
        return f"{value:.1f}"
    return f"{100 * value:.1f}%"
