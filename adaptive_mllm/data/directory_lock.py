"""A data directory shared by several runs: each run that uses it holds a shared lock, and its contents
are replaced only under an exclusive one, so a set in use is never deleted by another run.

The lock is ``fcntl.flock`` on ``{directory}/.lock``: the operating system drops it when the process
ends, however it ends, so a killed run never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class DirectoryLock:
    """A shared or exclusive hold on a directory; at most one at a time per instance."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            # read-only + create: opening never changes the file, so a read-only shared folder works
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        return self._fd

    def shared(self) -> None:
        """Hold the directory for reading; waits while a writer holds it."""
        fcntl.flock(self._open(), fcntl.LOCK_SH)

    def try_exclusive(self) -> bool:
        """Hold the directory for writing, if no other holder has it (never waits)."""
        try:
            fcntl.flock(self._open(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict:
        """A copy in another process (pickled) holds nothing: locks belong to the process that took them."""
        return {"path": self.path, "_fd": None}

    def __del__(self) -> None:
        self.release()
