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


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork: once the holder releases, the lock is free though the child lives."""
    holder = DirectoryLock(tmp_path)
    holder.shared()
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    child = os.fork()
    if child == 0:  # the child: say it runs (the fork hooks have run), then wait until the parent is done
        os.write(from_child, b"r")
        os.read(to_child, 1)
        os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"r"
        assert not DirectoryLock(tmp_path).try_exclusive()  # the parent's hold
        holder.release()
        writer = DirectoryLock(tmp_path)
        assert writer.try_exclusive(), "the forked child still holds the lock"
        writer.release()
    finally:
        os.write(from_parent, b"x")
        os.waitpid(child, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)
