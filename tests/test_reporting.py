"""Tables: exact Markdown layout, rich output."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from adaptive_mllm.reporting import format_table, print_table


def test_format_table_layout():
    table = format_table(["kind", "acc", "n"], [["color", "66.7%", 3], ["count", "100.0%", 12]])
    assert table == (
        "| kind  |    acc |   n |\n"
        "| ----- | -----: | --: |\n"
        "| color |  66.7% |   3 |\n"
        "| count | 100.0% |  12 |"
    )


def test_format_table_cells():
    table = format_table(["name", "value"], [["a|b", 0.123456], ["two\nlines", 7]])
    lines = table.splitlines()
    assert len(lines) == 4  # the newline in a cell did not start a row
    assert "a\\|b" in lines[2] and lines[2].count(" | ") == 1  # the "|" in a cell is escaped
    assert "0.1235" in lines[2]  # an unformatted float gets 4 significant digits
    assert "two lines" in lines[3]


def test_format_table_header_only():
    assert format_table(["x"], []) == "| x   |\n| --- |"


@pytest.mark.parametrize("rows", [[["a"]], [["a", "b", "c"]]])
def test_format_table_rejects_ragged_rows(rows):
    with pytest.raises(ValueError, match="cells for 2 columns"):
        format_table(["x", "y"], rows)


def test_format_table_rejects_no_columns():
    with pytest.raises(ValueError):
        format_table([], [])


def test_print_table():
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    print_table("test accuracy", ["question kind", "budget 0.5"], [["[color]", "66.7%"], ["count", 0.5]], console=console)
    text = buffer.getvalue()
    assert "test accuracy" in text
    assert "question kind" in text and "budget 0.5" in text
    assert "[color]" in text  # printed as text, not swallowed as rich markup
    assert "66.7%" in text and "0.5" in text


def test_print_table_rejects_ragged_rows():
    with pytest.raises(ValueError):
        print_table("t", ["x", "y"], [["a"]], console=Console(file=io.StringIO()))



def test_unwritable_reason_tries_a_write_in_the_folder_that_would_hold_the_output(tmp_path, monkeypatch):
    import errno
    import os

    from adaptive_mllm.reporting import unwritable_reason

    assert unwritable_reason(tmp_path / "new" / "deeper") is None
    assert sorted(tmp_path.iterdir()) == []  # nothing made, no probe left
    (tmp_path / "a-file").write_text("")
    assert unwritable_reason(tmp_path / "a-file" / "out") == f"{tmp_path / 'a-file'} is not a directory"

    def read_only(path, *args, **kwargs):  # a read-only mount: root's permission bits would say writable
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "open", read_only)
    assert unwritable_reason(tmp_path / "new") == f"cannot be written (it would be made in {tmp_path}): Read-only file system"
    assert unwritable_reason(tmp_path) == "cannot be written: Read-only file system"
