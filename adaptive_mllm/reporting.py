"""Tables for people: Markdown for files and W&B, rich for the terminal.

The tables are generic (a header and rows of cells); the caller decides how numbers read.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

Cell = str | float | int


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


def refuse_existing_output(parser: argparse.ArgumentParser, out: Path, overwrite: bool, files: Sequence[str] = ()) -> None:
    """A command's ``--out`` never replaces a file unasked: it may be a run's own answers, report or figure. A
    symlink there counts as a file, pointing anywhere or nowhere. ``files``: where ``--out`` is a folder (``table``),
    the files the command writes into it, each refused alike; ``--overwrite`` replaces these and nothing else there."""
    for path in [out / name for name in files] if files else [out]:
        named = f"--out {out}: {path}" if files else f"--out {out}"
        if path.is_dir():
            parser.error(f"{named} is a directory; " + ("choose another --out" if files else "name a file"))
        if (path.exists() or path.is_symlink()) and not overwrite:
            other, replaced = ("--out", f"{' and '.join(files)} (nothing else in it is written over)") if files else ("path", "it")
            parser.error(f"{named} exists; choose another {other}, or pass --overwrite to replace {replaced}")


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` as :func:`write_atomically` does. Newlines are written as given (a CSV's
    ``\\r\\n`` stays)."""
    return write_atomically(path, lambda handle: handle.write(text), binary=False)


def write_atomically(path: str | Path, write: Callable[[IO], object], binary: bool = True) -> Path:
    """Call ``write`` with a file handle whose content becomes ``path`` whole or not at all: a new temporary file
    beside it, renamed over it (``os.replace``), so a reader never sees half a file and a failed write leaves the
    old one. A symlink at ``path`` is replaced by the file, never written through (it may point at another run's
    file). Each call has its own temporary file, so two commands writing one path never mix their contents. A file
    replaced keeps its permissions (a report made private stays private); a new one gets the umask's, as ``open``
    gives them."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        if path.is_file() and not path.is_symlink():
            os.fchmod(descriptor, stat.S_IMODE(path.stat().st_mode))
        with os.fdopen(descriptor, "wb") if binary else os.fdopen(descriptor, "w", newline="") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def unwritable_reason(directory: str | Path) -> str | None:
    """Why no file can be made in ``directory`` (where it does not exist yet, in the nearest folder above it, where it
    would be made; nothing is created), or None. Tried with a file made and removed: permission bits alone miss
    read-only mounts, immutable folders and root."""
    asked = Path(directory).absolute()
    place = asked
    while not place.exists() and place.parent != place:
        place = place.parent
    if not place.is_dir():
        return f"{place} is not a directory"
    probe = place / f".adaptive-mllm-write-test.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as error:
        where = "" if place == asked else f" (it would be made in {place})"
        return f"cannot be written{where}: {error.strerror or error}"
    return None


DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


def write_failure(path: str | Path, error: OSError) -> OSError:
    """``error``, of writing ``path``, as an error that names the file (an ENOSPC from a flush or ``close`` names
    none): a full disk (ENOSPC) or an exhausted quota (EDQUOT) said as such. The same errno, so the same class
    (``OSError(errno.ENOENT, ...)`` is a FileNotFoundError); one that names the file already is returned as it is.
    Raise it ``from error``."""
    if getattr(error, "written_path", None) is not None:
        return error
    code = error.errno
    cause = error.strerror or str(error)
    if code in DISK_FULL:
        reason = f"{DISK_FULL[code]} ({errno.errorcode[code]}: {cause}); free space there and run again"
    else:
        reason = f"{errno.errorcode[code]}: {cause}" if code in errno.errorcode else cause
    named = OSError(code, f"could not write {path}: {reason}") if code is not None else OSError(f"could not write {path}: {reason}")
    named.written_path = str(path)  # type: ignore[attr-defined]
    return named


def write_durably(path: str | Path, write: Callable[[IO], object], binary: bool = True) -> Path:
    """:func:`write_atomically`, and on disk: the temporary file is flushed and synced (``fsync``) before it is renamed
    over ``path``, and the rename synced after (the folder), so neither a kill nor a power loss leaves half a file
    under the name. A failed write leaves no temporary file, and the old file (if any) as it was; its OSError names
    ``path``, and says where the disk is full (:func:`write_failure`)."""
    path = Path(path)

    def synced(handle: IO) -> None:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())

    try:
        write_atomically(path, synced, binary=binary)
    except OSError as error:
        raise write_failure(path, error) from error
    sync_directory(path.parent)
    return path


def write_text_durably(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8 to ``path``, as :func:`write_durably` writes (newlines as given: a CSV's ``\\r\\n`` stays)."""
    data = text.encode("utf-8")
    return write_durably(path, lambda handle: handle.write(data))


def sync_directory(directory: Path) -> None:
    """A rename on disk too (a power loss just after it could bring the old file back); skipped where a directory
    cannot be opened or synced (Windows, some network filesystems)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
