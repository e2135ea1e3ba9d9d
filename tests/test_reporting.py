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


class FillingFile:
    """A file on a disk that fills while it is written: the first write past ``room`` bytes keeps what fits, then
    fails with ENOSPC; so does every later write and flush, and ``close`` (as a buffered file's, whose data could not
    be flushed), which closes the file all the same."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room, self._full = handle, room, False

    def _no_space(self):
        import errno

        self._full = True
        return OSError(errno.ENOSPC, "No space left on device")

    def write(self, data):
        if self._full or len(data) > self._room:
            if not self._full:
                self._handle.write(data[: self._room])
                self._handle.flush()
            raise self._no_space()
        self._room -= len(data)
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self._full:
            raise self._no_space()
        self._handle.flush()

    def close(self):
        self._handle.close()
        if self._full:
            raise self._no_space()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def fill_disk(monkeypatch, name: str, room: int = 0) -> list[str]:
    """Every file opened for writing whose name holds ``name`` (a temporary file beside it too) lies on a full disk
    (:class:`FillingFile`), however it is opened: ``open``, ``Path.open`` / ``write_text`` and ``os.fdopen`` all go
    through ``io.open``. Returns the paths so opened, as they are opened."""
    import builtins
    import io
    import os

    real_open, real_os_open = io.open, os.open
    opened: list[str] = []
    descriptors: dict[int, str] = {}  # os.open's, by the path they were opened with (os.fdopen gets the number)

    def os_open(path, flags, *args, **kwargs):
        descriptor = real_os_open(path, flags, *args, **kwargs)
        descriptors[descriptor] = os.fspath(path)
        return descriptor

    def filling_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        where = descriptors.get(file, "") if isinstance(file, int) else os.fspath(file)
        if name in os.path.basename(where) and any(flag in mode for flag in "wax+"):
            opened.append(where)
            return FillingFile(handle, room)
        return handle

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", filling_open)
    monkeypatch.setattr(builtins, "open", filling_open)
    return opened


def test_a_durable_write_names_the_file_says_the_disk_is_full_and_leaves_no_half_file(tmp_path, monkeypatch):
    """Audit 2026-12 problems 2 and 4: a file written in place on a full disk was left cut under its name, and the
    error, ``[Errno 28] No space left on device``, named no file."""
    import errno
    import os

    from adaptive_mllm.reporting import write_durably, write_text_durably

    target = tmp_path / "submission.json"
    write_text_durably(target, '["old"]')
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append("replace"), real_replace(a, b))[1])
    write_durably(target, lambda handle: handle.write(b'["new"]'))
    assert target.read_text() == '["new"]' and synced[:2] == ["fsync", "replace"]  # on disk before it takes the name
    opened = fill_disk(monkeypatch, "submission.json", room=3)
    with pytest.raises(OSError, match=rf"could not write {target}: the disk is full \(ENOSPC: No space left on device\)") as caught:
        write_text_durably(target, '["newer", "and longer"]')
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, OSError)
    assert len(opened) == 1 and opened[0] != str(target)  # written beside it, ...
    assert target.read_text() == '["new"]' and sorted(path.name for path in tmp_path.iterdir()) == ["submission.json"]  # ... and removed


def test_write_failure_names_the_file_keeps_the_errno_and_its_class(tmp_path):
    import errno

    from adaptive_mllm.reporting import write_failure

    quota = write_failure(tmp_path / "a.csv", OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert str(quota) == f"[Errno {errno.EDQUOT}] could not write {tmp_path / 'a.csv'}: the disk quota is used up (EDQUOT: Disk quota exceeded); free space there and run again"
    denied = write_failure(tmp_path / "b.csv", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(denied, PermissionError) and str(denied) == f"[Errno {errno.EACCES}] could not write {tmp_path / 'b.csv'}: EACCES: Permission denied"
    assert write_failure(tmp_path / "c.csv", denied) is denied  # named once, not twice
