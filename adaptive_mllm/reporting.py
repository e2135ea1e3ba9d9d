"""Tables for people: Markdown for files and W&B, rich for the terminal.

The tables are generic (a header and rows of cells); the caller decides how numbers read, with
``percent`` for accuracies. ``accuracy_rows`` builds the usual layout: one row per group (question
kind), one column per score (model at each budget, majority baseline), and optionally a count column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

Cell = str | float | int
MISSING = "n/a"  # a score a column does not have for a group


def percent(value: float | None, decimals: int = 1) -> str:
    """An accuracy in [0, 1] as a percentage, e.g. ``0.8125 -> "81.2%"``; missing or NaN -> ``n/a``."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{100 * value:.{decimals}f}%"


def _cell(value: Cell) -> str:
    """Text of a cell: floats the caller did not format get 4 significant digits, not 17."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _check_rows(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    if not header:
        raise ValueError("a table needs at least one column")
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {index} has {len(row)} cells for {len(header)} columns: {list(row)}")


def _markdown_cell(value: Cell) -> str:
    # a "|" would end the cell and a newline the row
    return _cell(value).replace("\n", " ").replace("|", "\\|")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A Markdown table, columns padded to one width so it reads as well in a text file as rendered.

    The first column (the row names) is left-aligned, the others (scores) right-aligned.
    """
    _check_rows(header, rows)
    cells = [[_markdown_cell(c) for c in header]] + [[_markdown_cell(c) for c in row] for row in rows]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |"] + [line(row) for row in cells[1:]])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Cell]], console: Console | None = None) -> None:
    """The same table in the terminal with rich. Cells are plain text: a "[kind]" is not rich markup."""
    _check_rows(header, rows)
    table = Table(title=Text(title))
    for index, name in enumerate(header):
        table.add_column(Text(name), justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*[Text(_cell(c)) for c in row])
    (console or Console()).print(table)


def accuracy_rows(
    columns: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, int] | None = None,
    first: str = "question kind",
    overall: str = "overall",
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of an accuracy table: a row per group (``overall`` first, the rest sorted), a
    column per entry of ``columns`` (its name -> {group: accuracy}), then the example count if given.
    A group a column lacks reads ``n/a``."""
    groups = sorted({group for scores in columns.values() for group in scores} | set(counts or {}))
    if overall in groups:
        groups = [overall] + [group for group in groups if group != overall]
    header = [first, *columns] + (["examples"] if counts is not None else [])
    rows = []
    for group in groups:
        row = [group] + [percent(scores.get(group)) for scores in columns.values()]
        if counts is not None:
            row.append(str(counts.get(group, 0)))
        rows.append(row)
    return header, rows


def accuracy_table(
    columns: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, int] | None = None,
    first: str = "question kind",
) -> str:
    """``accuracy_rows`` as Markdown, e.g. ``{"budget 0.5": {...}, "majority baseline": {...}}``."""
    return format_table(*accuracy_rows(columns, counts, first))
