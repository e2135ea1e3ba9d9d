"""Tables for people: Markdown for files and W&B, rich for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table with aligned columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right" if name != header[0] else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)
