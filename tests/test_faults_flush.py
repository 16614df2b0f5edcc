"""A spool flush that fails for real fails every caller whose changes it may have carried.

The spool lives on a real ext2 filesystem in a loop device whose backing file sits on a
small tmpfs of the test's own (root only: skipped with the reason otherwise). Filling the
tmpfs makes the kernel's write-back of new blocks fail, so fdatasync, fsync and syncfs
return a real error, once: Linux then forgets it, and the next sync of the same file
succeeds although its data never reached the disk. A flush run by one caller carries the
changes every other caller noted before it started; those callers must fail too, never
hear of a later flush that had nothing left to sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.spool.commit import GroupCommit
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool

ENV = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=1000.0)
DATA = b"Subject: s\r\n\r\n" + b"body\r\n" * 2000
#: a file whose write-back needs blocks of the backing file never written before
BIG = b"Subject: s\r\n\r\n" + b"body\r\n" * 50_000


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(mount point of an ext2 filesystem, the tmpfs holding its backing file)."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted filesystem on a small tmpfs needs root")
    for tool in ("mount", "mkfs.ext2", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} to make a filesystem whose write-back fails")
    backing, mnt = tmp_path / "backing", tmp_path / "fs"
    backing.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,huge=never", "tmpfs", str(backing)],
                   check=True, timeout=30)
    try:
        image = backing / "image"
        with open(image, "wb") as f:
            f.truncate(64 << 20)  # sparse: the filesystem believes it has 64 MB
        subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], check=True, timeout=60)
        got = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], timeout=60,
                             capture_output=True, text=True, check=False)
        if got.returncode != 0:
            pytest.skip(f"cannot loop-mount a filesystem here: {got.stderr.strip()}")
        try:
            yield mnt, backing
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(backing)], check=False, timeout=30)


@contextlib.contextmanager
def full(backing: Path) -> Iterator[None]:
    """The backing tmpfs full while inside: write-back of any new block fails."""
    filler = backing / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 65536
        for _ in range(100_000):  # bounded: the tmpfs is 8 MB
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if size == 1:
                    break
                size //= 2
        yield
    finally:
        os.close(fd)
        os.unlink(filler)


def spool_on(path: Path) -> Spool:
    spool = Spool(path)
    spool.ensure()
    spool.open()
    os.sync()  # the empty layout on disk before anything fails
    return spool


@pytest.mark.parametrize("whole", [False, True], ids=["fdatasync", "syncfs"])
def test_a_message_whose_file_another_flush_failed_to_sync_is_never_acknowledged(
        flaky, whole):
    """Session A's file is taken by a flush someone else ran, which fails: A's own flush
    then has nothing left to sync (or syncs it "successfully", the error being reported
    once), and A must still hear an error, never 250; the spool healthy again, the next
    message is accepted."""
    mnt, backing = flaky
    spool = spool_on(mnt if whole else mnt / "spool")
    commit = GroupCommit(spool)

    async def run() -> None:
        since = spool.since()
        with full(backing):
            qid = spool.prepare(ENV, BIG)
            with pytest.raises(OSError):
                spool.flush()  # another session's batch, carrying A's file
        assert spool.syncfs is whole
        with pytest.raises(SpoolError):
            await commit.publish(qid, since=since)
        assert spool.locate(qid) is None
        assert os.listdir(spool.dir(State.INCOMING)) == []
        since = spool.since()
        again = spool.prepare(ENV, DATA)
        await commit.publish(again, since=since)
        assert spool.read(State.ACTIVE, again)[1] == DATA

    asyncio.run(run())
    spool.close()


@pytest.mark.parametrize("whole", [False, True], ids=["fdatasync", "syncfs"])
def test_a_delivery_change_a_failed_flush_carried_is_never_reported_durable(flaky, whole):
    """A delivery result's rename (move, or save, with durable=False) is noted; a flush
    someone else runs fails on a session's file it carried with it, and forgets the
    rename. The worker's barrier must fail, so the result is kept for Unsaved's retry,
    instead of the older file coming back after a crash (recipients sent twice)."""
    mnt, backing = flaky
    spool = spool_on(mnt if whole else mnt / "spool")
    qid = spool.accept(ENV, DATA)
    commit = GroupCommit(spool)

    async def run() -> None:
        since = spool.since()
        with full(backing):
            spool.move(qid, State.ACTIVE, State.DEFERRED, durable=False)
            spool.prepare(ENV, BIG)  # a session's file, waiting for the same flush
            with pytest.raises(OSError):
                spool.flush()  # a session's batch, carrying the worker's rename
        with pytest.raises(SpoolError):
            await commit.barrier(since=since)
        since = spool.since()
        spool.move(qid, State.DEFERRED, State.ACTIVE, durable=False)
        await commit.barrier(since=since)  # healthy again: later changes are durable

    asyncio.run(run())
    spool.close()


def test_syncfs_reports_a_write_back_error_another_syncfs_saw_first(flaky):
    """On a spool of its own filesystem one syncfs flushes everything; syncfs reports an
    error once per descriptor, and to a descriptor opened later only if nobody has seen
    it yet. The root is held open from the start, so the flush still fails after an
    operator's `sync -f` on that filesystem met the error first."""
    if shutil.which("sync") is None:
        pytest.skip("no sync command")
    mnt, backing = flaky
    spool = spool_on(mnt)
    commit = GroupCommit(spool)

    async def run() -> None:
        since = spool.since()
        with full(backing):
            qid = spool.prepare(ENV, BIG)
            seen = subprocess.run(["sync", "-f", str(mnt)], timeout=60, check=False,
                                  capture_output=True)
            assert seen.returncode != 0  # the error, reported to `sync` first
        with pytest.raises(SpoolError):
            await commit.publish(qid, since=since)
        assert spool.locate(qid) is None

    asyncio.run(run())
    spool.close()
