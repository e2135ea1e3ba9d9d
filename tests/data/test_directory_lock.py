"""DirectoryLock: shared holders coexist, a writer is refused while anyone holds the directory."""

from __future__ import annotations

import errno
import os

import pytest

from adaptive_mllm.data.directory_lock import DirectoryLock


def test_shared_holders_coexist_and_exclude_a_writer(tmp_path):
    first, second, writer = DirectoryLock(tmp_path), DirectoryLock(tmp_path), DirectoryLock(tmp_path)
    first.shared()
    second.shared()  # would block forever if shared holds excluded each other
    assert not writer.try_exclusive()
    first.release()
    assert not writer.try_exclusive()  # the second still holds it
    second.release()
    assert writer.try_exclusive()
    assert not DirectoryLock(tmp_path).try_exclusive()  # and now it excludes other writers
    writer.release()


def test_a_read_only_directory_is_held_by_nobody(tmp_path, monkeypatch):
    """Where the lock file cannot be created, reading goes on without a lock; writing says why not."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".lock"))

    monkeypatch.setattr(os, "open", read_only)
    lock = DirectoryLock(tmp_path)
    lock.shared()
    with pytest.raises(OSError, match="Read-only"):
        lock.try_exclusive()
