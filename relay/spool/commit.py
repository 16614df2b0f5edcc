"""Group commit: one spool flush shared by every change waiting at the same moment.

An fsync costs a journal commit whatever it carries. Accepting a message durably takes
two barriers (its file before the rename into active/, the rename before the 250), and a
delivery result one; with one fsync per file and directory that was seven journal commits
per message, and the disk's commit rate, not the CPU, capped the relay. Here every change
waiting when a flush starts rides on it: callers do their own writes and renames without
syncing (relay.spool.spool's prepare/publish/bury and durable=False), then wait here for a
flush that *started after* their change. Nobody skips a flush; under load each one serves
as many changes as arrived during the previous one, and an idle relay pays no added
latency (the first waiter starts a flush at once). A flush syncs what its batch changed:
each new file and each changed directory once, or one syncfs when the spool is a
filesystem of its own (relay.spool.files.Durable.flush). A finished message's unlink
is made in the batch too, with the renames into active/ (one fsync of active/ for both):
on the event loop an unlink waits for the journal's commit of the directory block it
changes (0.3 ms on average under load, the loop idle meanwhile).

The flushes run on one thread of the group commit's own, fed by a queue: a hand-off costs a
lock and a notify, half of what a thread pool's submit and future chaining cost; the
thread ends after IDLE seconds without work and starts again with the next batch.

A message is in active/ from its rename on, but its client hears 250 only after the second
flush. Until then its id is in `unacknowledged`, and delivery does not take it: if that
flush fails, the message is taken back out of active/ and the client told 451, and its
retry is then the only copy that is ever sent (invariants 1 to 3: nothing acknowledged is
lost, nothing half-written is queued, nothing is sent that the client will send again).
A flush also carries what callers of later batches changed already; when it fails, each
caller whose changes predate the failure fails too (Spool.since/check: the kernel reports
a write-back error once, so a later flush of the same file succeeds with its data lost).

Core module: asyncio and the spool only.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import SpoolError
from relay.spool.files import as_spool_error
from relay.spool.record import State
from relay.spool.spool import Spool
from relay.threads import background

log = logging.getLogger("relay.commit")

#: seconds without a batch after which the commit thread ends (the next batch starts one)
IDLE = 5.0


@dataclass
class _Batch:
    #: each with Spool.since() from before its caller's changes
    waiters: list[tuple[asyncio.Future[None], int]] = field(default_factory=list)
    publish: list[tuple[str, asyncio.Future[None], int]] = field(default_factory=list)
    #: finished messages to unlink before the flush: (state, queue id, caller's future)
    buried: list[tuple[State, str, asyncio.Future[None]]] = field(default_factory=list)
    graves: list[Path] = field(default_factory=list)


class CommitThread:
    """One thread that runs jobs in order, started on demand, ended when idle."""

    def __init__(self, name: str = "relay-commit") -> None:
        self.name = name
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._cv = threading.Condition()
        self._alive = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._cv:
            self._jobs.append(job)
            if self._alive:
                self._cv.notify()
                return
            self._alive = True
        threading.Thread(target=self._main, name=self.name, daemon=True).start()

    def _main(self) -> None:
        background()
        while True:
            with self._cv:
                if not self._jobs:
                    self._cv.wait(IDLE)
                if not self._jobs:
                    self._alive = False  # decided under the lock: submit starts another
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # noqa: BLE001 - the thread serves every later batch too
                log.exception("group commit job failed")


class GroupCommit:
    """Shares spool flushes between concurrent sessions and delivery workers."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._next = _Batch()
        self._task: asyncio.Task[None] | None = None
        self._thread = CommitThread()
        #: published but not yet answered: delivery must not take these (see above)
        self.unacknowledged: set[str] = set()
        self.flushes = 0  #: flushes done (each one journal commit)
        self.changes = 0  #: changes they carried

    async def publish(self, qid: str, *, since: int | None = None) -> None:
        """Durably move a prepared message (Spool.prepare) into active/.

        Its files are flushed, then it is renamed into active/, then that rename is
        flushed; the rename and both flushes are shared with the whole batch. On failure
        the message is removed again (the client was not told 250) and SpoolError raised;
        also when any flush failed since `since` (Spool.since() taken before prepare: that
        flush may have carried its file, and a write-back error is reported only once).
        """
        if not self.spool.fsync:
            await asyncio.to_thread(self.spool.publish, qid)
            return
        fut = asyncio.get_running_loop().create_future()
        mark = self.spool.since() if since is None else since
        self._next.publish.append((qid, fut, mark))
        self.unacknowledged.add(qid)
        self._kick()
        try:
            await fut
        finally:
            # after the outcome: on failure the message has already left active/ again
            self.unacknowledged.discard(qid)

    async def barrier(self, grave: Path | None = None, *, since: int | None = None) -> None:
        """Wait until everything the caller changed before this call is durable.

        `since` (Spool.since() taken before the caller's changes): SpoolError when any
        flush failed after it, even one another caller ran (it may have carried these
        changes). `grave` (from Spool.bury of a message directory of the older layout)
        is deleted once the flush that makes its rename durable is done, off the
        caller's path.
        """
        if not self.spool.fsync:
            if grave is not None:
                await asyncio.to_thread(shutil.rmtree, grave, True)
            return
        fut = asyncio.get_running_loop().create_future()
        self._next.waiters.append((fut, self.spool.since() if since is None else since))
        if grave is not None:
            self._next.graves.append(grave)
        self._kick()
        await fut

    async def bury(self, state: State, qid: str, *, since: int | None = None) -> None:
        """Remove a finished message durably (Spool.bury, then a flush), the unlink made
        by the commit thread with the batch. FileNotFoundError when the message was moved
        or deleted meanwhile (nothing removed); SpoolError as barrier()."""
        if not self.spool.fsync:
            grave = self.spool.bury(state, qid)
            if grave is not None:
                await asyncio.to_thread(shutil.rmtree, grave, True)
            return
        fut = asyncio.get_running_loop().create_future()
        self._next.buried.append((state, qid, fut))
        self._next.waiters.append((fut, self.spool.since() if since is None else since))
        self._kick()
        await fut

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next.waiters or self._next.publish:
                batch, self._next = self._next, _Batch()
                # the thread resolves the futures itself (`done` with them), then deletes
                # the graves while the next batch may already be queued behind
                done = loop.create_future()
                self._thread.submit(functools.partial(self._commit, batch, loop, done))
                await done
        finally:
            self._task = None

    def _commit(self, batch: _Batch, loop: asyncio.AbstractEventLoop,
                done: asyncio.Future[None]) -> None:
        """In the commit thread: flush, publish and unlink, flush (only the second when
        nothing is published); answer everyone; then clean up."""
        spool = self.spool
        marks = [(fut, since) for _, fut, since in batch.publish] + batch.waiters
        futures = [fut for fut, _ in marks]
        outcome: dict[int, BaseException | None] = {}
        durable = False  #: this batch's flushes succeeded: its retired files may be reused
        try:
            published = 0
            if batch.publish:
                spool.flush()  # the new files, before their renames
                self.flushes += 1
                published = self._publish(batch, outcome)
            # the unlinks of active/ ride on the same fsync of active/ as the renames
            self._bury(batch, outcome)
            if published or batch.buried or not batch.publish:
                spool.flush()
                self.flushes += 1
            durable = True
            for fut, since in marks:
                try:
                    spool.check(since)  # a flush another caller ran failed meanwhile
                except SpoolError as exc:
                    outcome.setdefault(id(fut), exc)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear something
            # OSError -> SpoolError (SpoolFullError when out of space); the rest as is
            err = as_spool_error(exc)
            outcome = {id(fut): err for fut in futures}
        try:
            self.changes += len(futures)
            for qid, fut, _ in batch.publish:
                if outcome.get(id(fut)) is not None:
                    # never acknowledged: take it back out of active/ if it got there
                    spool.abandon(qid)
        finally:
            try:
                loop.call_soon_threadsafe(_resolve, [*futures, done], outcome)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more
        # spares go back to the spool for the next messages once their flush is done
        spool.recycle(batch.graves, reuse=durable)

    def _publish(self, batch: _Batch, outcome: dict[int, BaseException | None]) -> int:
        """The batch's renames into active/; how many were made."""
        published = 0
        for qid, fut, since in batch.publish:
            try:
                self.spool.check(since)  # its file went with a flush that failed
                self.spool.publish(qid)
                published += 1
            except (OSError, SpoolError) as exc:
                outcome[id(fut)] = as_spool_error(exc)
        return published

    def _bury(self, batch: _Batch, outcome: dict[int, BaseException | None]) -> None:
        """The batch's unlinks, before its flush; a failed one is that caller's outcome
        (FileNotFoundError as it is: moved or deleted by an operator meanwhile)."""
        for state, qid, fut in batch.buried:
            try:
                grave = self.spool.retire(state, qid)
            except FileNotFoundError as exc:
                outcome[id(fut)] = exc
            except OSError as exc:
                outcome[id(fut)] = as_spool_error(exc)
            else:
                if grave is not None:
                    batch.graves.append(grave)


def _resolve(futures: list[asyncio.Future[None]],
             outcome: dict[int, BaseException | None]) -> None:
    for fut in futures:
        if fut.done():
            continue
        err = outcome.get(id(fut))
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


__all__ = ["GroupCommit"]
