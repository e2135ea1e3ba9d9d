"""Figures of a budget sweep: score against budget and against FLOPs, and plan-usage heatmaps.

``adaptive-mllm test`` writes them for its own run (and logs them to W&B); ``adaptive-mllm plot``
combines the ``test_results.csv`` of several runs (e.g. AdaLLaVA-L vs Static vs PruMerge+L) into one::

    adaptive-mllm plot runs/tiny/test_results.csv runs/tiny-static/test_results.csv \\
        --labels AdaLLaVA-L Static --out curves.png
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from adaptive_mllm.reporting import refuse_existing_output, write_atomically  # noqa: E402

Rows = Sequence[Mapping[str, float]]
RESULTS_FILE = "test_results.csv"


def read_results_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``test_results.csv`` (one per budget), numbers as floats; a run's directory stands for the
    ``test_results.csv`` in it. An empty cell is a score the run has not (left out of its row); a clear error,
    naming the file (and row and column), for a file that is not such a table."""
    path = Path(path)
    if path.is_dir():
        if not (path / RESULTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path}: a directory without {RESULTS_FILE} (expected a test run's log dir, or a {RESULTS_FILE} file)"
            )
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file (written by `adaptive-mllm test` in its log dir)")
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not {error.encoding} text ({_undecodable(path, error)}); expected a {RESULTS_FILE}") from None
    except csv.Error as error:
        raise ValueError(f"{path}: not a CSV table ({error}); expected a {RESULTS_FILE}") from None
    if not rows or "budget" not in rows[0]:
        raise ValueError(f"{path}: not a test_results.csv (expected a header with a 'budget' column)")
    parsed = []
    first_row: dict[float, int] = {}
    for index, row in enumerate(rows):
        if None in row:  # cells beyond the header's
            raise ValueError(f"{path}: row {index + 1}: {len(header) + len(row[None])} cells for the header's {len(header)} columns")
        missing = [key for key, value in row.items() if value is None]  # the row ends before these columns
        if missing:
            raise ValueError(f"{path}: row {index + 1}: column {missing[0]!r}: no cell (the row has {len(header) - len(missing)} of {len(header)})")
        try:
            parsed.append({key: float(value) for key, value in row.items() if value != ""})
        except ValueError as error:
            raise ValueError(f"{path}: row {index + 1}: {error}") from None
        if "budget" not in parsed[-1]:
            raise ValueError(f"{path}: row {index + 1}: column 'budget' is empty")
        budget = parsed[-1]["budget"]
        earlier = first_row.setdefault(budget, index + 1)
        if earlier != index + 1:
            raise ValueError(f"{path}: row {index + 1}: budget {budget:g} appears twice (first in row {earlier})")
    return parsed


def _undecodable(path: Path, error: UnicodeDecodeError) -> str:
    """Where the file stops being text: the codec's error counts bytes from the chunk it was given, not the file."""
    data = path.read_bytes()
    try:
        data.decode(error.encoding)
    except UnicodeDecodeError as whole:
        line = data.count(b"\n", 0, whole.start) + 1
        return f"{whole.reason} at byte {whole.start}, line {line}"
    return error.reason


def check_figure_path(parser: argparse.ArgumentParser, out: str | Path) -> None:
    """A usage error for an ``--out`` whose extension matplotlib cannot write (none: its default, PNG)."""
    extension = Path(out).suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in formats:
        parser.error(f"--out {out}: matplotlib cannot write .{extension} figures; supported: {', '.join(sorted(formats))}")


def plot_budget_curves(runs: Mapping[str, Rows], metric: str = "overall", baseline: float | None = None) -> Figure:
    """Two panels, one line per run: ``metric`` against the requested budget and against the FLOPs
    fraction the plans actually used. A percentage axis runs from the majority-answer ``baseline`` (drawn
    dashed; a fraction) or 0 up to 100, so a 0.1-point wiggle looks like one, not like a cliff."""
    figure, (by_budget, by_flops) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    scores_seen = []
    for label, rows in runs.items():
        rows = sorted(rows, key=lambda row: row["budget"])
        scores = [100 * row.get(metric, float("nan")) for row in rows]
        scores_seen += [score for score in scores if score == score]
        by_budget.plot([row["budget"] for row in rows], scores, marker="o", label=label)
        by_flops.plot([row.get("flops_fraction", float("nan")) for row in rows], scores, marker="o", label=label)
    percent = bool(scores_seen) and 0 <= min(scores_seen) and max(scores_seen) <= 100
    for axes, xlabel in ((by_budget, "budget"), (by_flops, "FLOPs fraction (analytic)")):
        if baseline is not None:
            axes.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="majority baseline")
        if percent:
            bottom = 0.0 if baseline is None else min(100 * baseline, min(scores_seen))
            axes.set_ylim(bottom - 2, 102)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(f"{metric} (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    by_budget.set_title(f"{metric} vs budget")
    by_flops.set_title(f"{metric} vs FLOPs")
    return figure


def plot_layer_usage(usage: Mapping[float, Mapping[str, torch.Tensor]], num_prefix_layers: int = 0) -> Figure:
    """Heatmap: one row per (budget, question kind), one column per LLM layer; the fraction of
    examples that ran the layer. Rows of one budget that differ show plans adapting to content."""
    labels, matrix = [], []
    for budget in sorted(usage, reverse=True):
        for kind, fractions in usage[budget].items():
            labels.append(f"{budget:g} / {kind}")
            matrix.append(fractions.float())
    data = torch.stack(matrix).numpy() if matrix else torch.zeros(1, 1).numpy()
    figure, axes = plt.subplots(figsize=(max(4, 0.35 * data.shape[1] + 3), max(2, 0.3 * len(labels) + 1.5)), constrained_layout=True)
    image = axes.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xlabel("LLM layer")
    if num_prefix_layers:
        axes.axvline(num_prefix_layers - 0.5, color="white", linewidth=1)
    axes.set_title("layers run (fraction of examples), per budget / question kind")
    figure.colorbar(image, ax=axes)
    return figure


def plot_group_usage(usage: Mapping[float, torch.Tensor]) -> Figure:
    """One heatmap per budget: layers x key/value groups, the fraction of examples that ran each."""
    budgets = sorted(usage, reverse=True)
    figure, axes = plt.subplots(1, len(budgets), figsize=(3 * len(budgets) + 1, 4), squeeze=False, constrained_layout=True)
    image = None
    for axis, budget in zip(axes[0], budgets, strict=True):
        image = axis.imshow(usage[budget].float().numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_title(f"budget {budget:g}")
        axis.set_xlabel("key/value group")
        axis.set_ylabel("LLM layer")
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist())
    return figure


def save(figure: Figure, path: str | Path) -> Path:
    """The figure in the format its suffix names (png without one), written whole or not at all, replacing a link
    at ``path`` rather than writing through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, lambda handle: figure.savefig(handle, dpi=120, format=path.suffix[1:] or "png"))
    finally:
        plt.close(figure)
    return path


def _run_name(path: Path) -> str:
    """A run's default label: its directory's name (of the CSV's folder, or of the directory given)."""
    return (path.name if path.is_dir() else path.parent.name) or str(path)


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="adaptive-mllm plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="test_results.csv files (or the test runs' directories), one per run")
    parser.add_argument("--labels", nargs="+", help="a legend label per file (default: the run directory's name)")
    parser.add_argument("--metric", default="overall", help="the column to plot (a question kind, or overall)")
    parser.add_argument("--out", default="comparison_curves.png", help="the figure (not a name a run writes)")
    parser.add_argument("--overwrite", action="store_true", help="write over an existing --out file")
    args = parser.parse_args(argv)
    refuse_existing_output(parser, Path(args.out), args.overwrite)
    check_figure_path(parser, args.out)
    labels = args.labels or [_run_name(Path(path)) for path in args.results]
    if len(labels) != len(args.results):
        parser.error(f"{len(labels)} labels for {len(args.results)} result files")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # curves are keyed by label: one would silently replace the other
        parser.error(f"two runs are labelled {repeated[0]!r}: give each its own with --labels")
    runs = {}
    for label, path in zip(labels, args.results, strict=True):
        rows = read_results_csv(path)
        if args.metric not in rows[0]:
            parser.error(f"{path}: no column {args.metric!r}; columns: {sorted(rows[0])}")
        runs[label] = rows
    out = save(plot_budget_curves(runs, args.metric), args.out)
    print(f"wrote {out}")
    return out
