"""A data directory shared by several runs: each run that uses it holds a shared lock, and its contents
are replaced only under an exclusive one, so a set in use is never deleted by another run.

The lock is ``fcntl.flock`` on ``{directory}/.lock``: the operating system drops it when the process
ends, however it ends, so a killed run never leaves the directory locked. A forked child (a DataLoader
worker) closes its copy at once, so the lock ends with the holder's ``release``, not with its workers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from pathlib import Path

LOCK_FILE = ".lock"
_OPEN: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()  # instances with an open lock file


def _forget_in_child() -> None:
    """After a fork, in the child: close the inherited lock files (the parent's locks stay held)."""
    for lock in list(_OPEN):
        lock.release()


os.register_at_fork(after_in_child=_forget_in_child)


class DirectoryLock:
    """A shared or exclusive hold on a directory; at most one at a time per instance."""

    def __init__(self, directory: str | Path, name: str = LOCK_FILE) -> None:
        self.path = Path(directory) / name
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            # read-only + create: opening never changes the file, so a read-only shared folder works
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            _OPEN.add(self)
        return self._fd

    def shared(self) -> None:
        """Hold the directory for reading; waits while a writer holds it. In a directory where the lock
        file cannot be created (read-only), holds nothing: this process could not replace the set either."""
        try:
            fd = self._open()
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return
            raise
        fcntl.flock(fd, fcntl.LOCK_SH)

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
        _OPEN.discard(self)

    def __getstate__(self) -> dict:
        """A copy in another process (pickled) holds nothing: locks belong to the process that took them."""
        return {"path": self.path, "_fd": None}

    def __del__(self) -> None:
        self.release()
