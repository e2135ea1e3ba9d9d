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


def test_write_text_atomically_replaces_whole_never_through_a_symlink_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os
    import stat

    from adaptive_mllm.reporting import write_text_atomically

    target = tmp_path / "table.csv"
    write_text_atomically(target, "a,b\r\n1,2\r\n")
    assert target.read_bytes() == b"a,b\r\n1,2\r\n"  # newlines as given
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # as open() would make it, not mkstemp's 0600
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    link = tmp_path / "link.md"
    link.symlink_to(victim)
    write_text_atomically(link, "table\n")
    assert victim.read_text() == "mine\n" and not link.is_symlink() and link.read_text() == "table\n"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(target, "other\n")
    assert target.read_bytes() == b"a,b\r\n1,2\r\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link.md", "table.csv", "victim.txt"]  # no temporary left


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_refuse_existing_output_counts_a_symlink_as_a_file(tmp_path):
    import argparse

    from adaptive_mllm.reporting import refuse_existing_output

    dangling = tmp_path / "figure.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(SystemExit):
        refuse_existing_output(argparse.ArgumentParser(), dangling, overwrite=False)
    refuse_existing_output(argparse.ArgumentParser(), dangling, overwrite=True)


def test_refuse_existing_output_in_a_folder_names_the_file_and_what_overwrite_replaces(tmp_path, capsys):
    """``table --out DIR`` writes files into DIR: each is refused as a lone ``--out`` file is, the message naming it."""
    import argparse

    from adaptive_mllm.reporting import refuse_existing_output

    files = ("t.md", "t.csv")
    refuse_existing_output(argparse.ArgumentParser(), tmp_path, overwrite=False, files=files)  # an empty folder: fine
    (tmp_path / "t.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(SystemExit):
        refuse_existing_output(argparse.ArgumentParser(), tmp_path, overwrite=False, files=files)
    assert (f"--out {tmp_path}: {tmp_path / 't.csv'} exists; choose another --out, or pass --overwrite to replace t.md and "
            "t.csv (nothing else in it is written over)") in capsys.readouterr().err  # fmt: skip
    refuse_existing_output(argparse.ArgumentParser(), tmp_path, overwrite=True, files=files)
    (tmp_path / "t.md").mkdir()
    with pytest.raises(SystemExit):
        refuse_existing_output(argparse.ArgumentParser(), tmp_path, overwrite=True, files=files)
    assert f"--out {tmp_path}: {tmp_path / 't.md'} is a directory; choose another --out" in capsys.readouterr().err


def test_a_file_replaced_atomically_keeps_its_permissions(tmp_path):
    """`compare --out report.md --overwrite` made a private (0600) report readable by all (0644)."""
    import stat

    from adaptive_mllm.reporting import write_atomically, write_text_atomically

    report = tmp_path / "report.md"
    report.write_text("old\n")
    report.chmod(0o600)
    write_text_atomically(report, "new\n")
    assert report.read_text() == "new\n" and stat.S_IMODE(report.stat().st_mode) == 0o600
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"old")
    figure.chmod(0o640)
    write_atomically(figure, lambda handle: handle.write(b"new"))
    assert figure.read_bytes() == b"new" and stat.S_IMODE(figure.stat().st_mode) == 0o640
