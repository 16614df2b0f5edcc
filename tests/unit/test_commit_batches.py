"""What one group commit batch does, in order, on a real spool: a delivery's unlink of a
finished message shares the flush that makes the ingress's renames into active/ durable
(one fsync of active/ for both), is never made before the flush of the new files, and a
batch of unlinks alone costs one flush, made after them. An unlink of a message an
operator moved meanwhile fails that caller alone with FileNotFoundError. An unlink a
failed flush carried is synced again by the next one."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.spool.commit import GroupCommit
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool

ENV = Envelope("a@example.com", ("b@example.net",), time.time())
DATA = b"Subject: t\r\n\r\nbody\r\n"


class Watched(Spool):
    """A real spool noting, at each flush, what active/ and incoming/ held."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=True)
        self.seen: list[tuple[list[str], list[str]]] = []

    def flush(self) -> None:
        self.seen.append((sorted(self.scan(State.INCOMING)), sorted(self.scan(State.ACTIVE))))
        super().flush()


@pytest.fixture
def spool(tmp_path: Path) -> Watched:
    spool = Watched(tmp_path / "spool")
    spool.ensure()
    return spool


def test_unlinks_ride_on_the_flush_of_the_renames_into_active(spool: Watched) -> None:
    done = Spool(spool.root, fsync=False).accept(ENV, DATA)  # delivered, to be removed
    commit = GroupCommit(spool)

    async def run() -> None:
        new = spool.prepare(ENV, DATA)
        await asyncio.gather(commit.publish(new), commit.bury(State.ACTIVE, done))
        assert spool.seen == [
            ([new], [done]),  # the new file synced first; nothing renamed or removed yet
            ([], [new]),      # then its rename and the unlink, synced together
        ]

    asyncio.run(run())
    assert commit.flushes == 2


def test_unlinks_alone_take_one_flush_made_after_them(spool: Watched) -> None:
    qids = [Spool(spool.root, fsync=False).accept(ENV, DATA) for _ in range(3)]
    commit = GroupCommit(spool)

    async def run() -> None:
        await asyncio.gather(*(commit.bury(State.ACTIVE, q) for q in qids))

    asyncio.run(run())
    assert spool.seen == [([], [])]
    assert commit.flushes == 1


def test_a_message_moved_meanwhile_fails_only_its_own_unlink(spool: Watched) -> None:
    held, done = (Spool(spool.root, fsync=False).accept(ENV, DATA) for _ in range(2))
    spool.move(held, State.ACTIVE, State.HOLD)
    commit = GroupCommit(spool)

    async def run() -> list[BaseException | None]:
        return await asyncio.gather(commit.bury(State.ACTIVE, held),
                                    commit.bury(State.ACTIVE, done), return_exceptions=True)

    first, second = asyncio.run(run())
    assert isinstance(first, FileNotFoundError) and second is None
    assert list(spool.scan(State.HOLD)) == [held] and list(spool.scan(State.ACTIVE)) == []


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded: 10 s) for what the commit thread does after answering."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the commit thread did not get there in 10 s")


class FailsOnce(Spool):
    """A real spool whose next directory sync fails once, like an I/O error would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=True)
        self.fail_next = False
        self.synced_dirs: list[set[State]] = []

    def _sync(self, files: list[int], dirs: set[State]) -> None:
        self.synced_dirs.append(set(dirs))
        if self.fail_next and dirs:
            self.fail_next = False
            for fd in files:
                os.close(fd)
            raise OSError(errno.EIO, "write-back failed")
        super()._sync(files, dirs)


async def failed_bury(tmp_path: Path) -> tuple[FailsOnce, GroupCommit, str]:
    """A message published, then delivered: the flush carrying its unlink fails."""
    spool = FailsOnce(tmp_path / "spool")
    spool.ensure()
    commit = GroupCommit(spool)
    qid = spool.prepare(ENV, DATA)
    await commit.publish(qid)
    spool.fail_next = True
    with pytest.raises(SpoolError):
        await commit.bury(State.ACTIVE, qid)  # SES took it; its removal is not durable
    return spool, commit, qid


async def test_an_unlink_a_failed_flush_carried_is_synced_again_by_the_next_flush(
        tmp_path: Path) -> None:
    spool, commit, qid = await failed_bury(tmp_path)
    assert not (spool.root / "active" / qid).exists()
    # the unsaved-results retry finds the file gone and waits for a flush: that flush
    # syncs active/ again, so the unlink is durable when it reports the result saved
    since = spool.since()
    await commit.barrier(since=since)
    assert State.ACTIVE in spool.synced_dirs[-1]


async def test_a_finished_message_file_takes_a_later_message_once_its_removal_is_durable(
        spool: Watched) -> None:
    commit = GroupCommit(spool)
    big = b"Subject: big\r\n\r\n" + b"x" * 50_000 + b"\r\n"
    first = spool.prepare(ENV, big)
    await commit.publish(first)
    inode = os.stat(spool.path(State.ACTIVE, first)).st_ino
    await commit.bury(State.ACTIVE, first)
    assert list(spool.scan(State.ACTIVE)) == [] and list(spool.scan(State.INCOMING)) == []
    await until(lambda: len(spool.spares) == 1)  # emptied by the commit thread, after the flush
    # the next message is written into the same inode, emptied first: nothing of the
    # finished one is left in it, and its queue id is its own
    second = spool.prepare(ENV, DATA)
    assert os.stat(spool.path(State.INCOMING, second)).st_ino == inode
    await commit.publish(second)
    record = spool.load(State.ACTIVE, second)
    assert record.id == second
    assert spool.read_message(State.ACTIVE, second, record) == DATA
    assert os.path.getsize(spool.path(State.ACTIVE, second)) < len(big)


async def test_a_file_whose_removal_a_failed_flush_carried_never_takes_another_message(
        tmp_path: Path) -> None:
    spool, commit, _ = await failed_bury(tmp_path)
    # its entry in active/ may still be on disk: a crash would bring the message back,
    # so its inode must not hold another message meanwhile: it is deleted, not kept
    await until(lambda: not os.listdir(spool.dir(State.INCOMING)))
    assert len(spool.spares) == 0
    other = spool.prepare(ENV, DATA)
    await commit.publish(other)
    assert spool.read_message(State.ACTIVE, other, spool.load(State.ACTIVE, other)) == DATA


async def test_spare_files_are_removed_at_start_and_not_counted_as_messages(
        spool: Watched) -> None:
    commit = GroupCommit(spool)
    qids = [spool.prepare(ENV, DATA) for _ in range(3)]
    await asyncio.gather(*(commit.publish(q) for q in qids))
    await asyncio.gather(*(commit.bury(State.ACTIVE, q) for q in qids))
    await until(lambda: len(spool.spares) == 3)
    spares = [e.name for e in os.scandir(spool.dir(State.INCOMING))]
    assert len(spares) == 3 and all(n.startswith(".spare-") for n in spares)
    spool.prepare(ENV, DATA)  # never published: garbage at the next start
    assert spool.recover() == 1
    assert os.listdir(spool.dir(State.INCOMING)) == []
    assert spool.prepare(ENV, DATA)  # with no spare left, a new file
