"""The scheduler: which queued messages the workers take next.

Keeps a bounded ready queue of queue ids read from active/ (each claimed once, so no two
workers hold one message), filled when the ingress tells of new mail, when due mail was
promoted, when workers have drained a full queue to half, and every scan_interval. The
promoter moves due mail from deferred/ back to active/ (a rename; the next attempt is the
mtime) in batches, reading deferred/ only when something there can be due. Reads active/
and deferred/; renames deferred/ -> active/. Built and started by the delivery pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable

from relay.delivery.account import Gate
from relay.delivery.settings import PoolSettings
from relay.log import event
from relay.spool.record import State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")

#: A pass over deferred/ stats every message there; reading it takes at most this share
#: of the time (with a million deferred, one pass reads for seconds).
DEFERRED_PASS_SHARE = 0.1
#: Due deferred messages moved back to active/ per fsync of active/.
ACTIVATE_BATCH = 256
#: A directory modified this recently may change again within the same timestamp tick,
#: leaving its mtime as it was: such an mtime is not trusted to mean "unchanged".
MTIME_SETTLE = 1.0


class Scheduler:
    def __init__(self, *, spool: Spool, gate: Gate, settings: PoolSettings,
                 clock: Callable[[], float]) -> None:
        self.spool = spool
        self.gate = gate
        self.settings = settings
        self.owns = settings.partition.owns
        self.clock = clock
        self.ready: asyncio.Queue[str] = asyncio.Queue(maxsize=settings.ready_queue)
        #: queue ids in the ready queue or held by a worker
        self.claimed: set[str] = set()
        self.rescan = asyncio.Event()
        #: the ready queue was found full: refill once workers have drained half of it
        self._want_room = False
        #: the earliest next attempt the last pass over deferred/ left there (0: unknown)
        self.next_due = 0.0
        #: deferred/'s mtime when that pass began, if settled (see MTIME_SETTLE)
        self._deferred_seen: int | None = None

    # -- the workers' side ----------------------------------------------------------

    def notify(self, qid: str) -> None:
        """A message was just queued in active/ (the ingress, a DSN)."""
        if self.gate.stopping or qid in self.claimed:
            return
        try:
            self.ready.put_nowait(qid)
            self.claimed.add(qid)
        except asyncio.QueueFull:
            self.rescan.set()

    def wake(self) -> None:
        """Read active/ again now (e.g. on resume: mail was left there while paused)."""
        self.rescan.set()

    async def take(self) -> str:
        """The next claimed queue id; release() it when done with it."""
        qid = await self.ready.get()
        self.taken()
        return qid

    def release(self, qid: str) -> None:
        self.claimed.discard(qid)

    def taken(self) -> None:
        """A message left the ready queue: once a queue found full is down to half, the
        scanner reads active/ again."""
        if self._want_room and self.ready.qsize() <= self.ready.maxsize // 2:
            self._want_room = False
            self.rescan.set()

    # -- active/ --------------------------------------------------------------------

    async def scanner(self) -> None:
        """Keep the ready queue filled from active/. Woken by ingress, by the promoter,
        by a worker that drained a full queue to half, and every scan_interval (work
        placed by the queue CLI)."""
        self.rescan.set()
        while True:
            self.rescan.clear()
            if not self.gate.closed:
                try:
                    await self.fill()
                except OSError as exc:
                    event(log, "scan_error", level=logging.ERROR, error=str(exc))
            try:
                await asyncio.wait_for(self.rescan.wait(), timeout=self.settings.scan_interval)
            except TimeoutError:
                pass

    async def fill(self) -> None:
        room = self.ready.maxsize - self.ready.qsize()
        if room > 0:
            for qid in await asyncio.to_thread(self.unclaimed, room):
                if self.ready.full():
                    break
                if qid not in self.claimed:
                    self.claimed.add(qid)
                    self.ready.put_nowait(qid)
        if self.ready.full():
            # more may wait in active/: read it again once there is room, not in a loop
            self._want_room = True

    def unclaimed(self, room: int) -> list[str]:
        """Up to `room` queue ids in active/ that no worker holds or waits for."""
        out: list[str] = []
        for qid in self.spool.scan(State.ACTIVE):
            if qid not in self.claimed and self.owns(qid):
                out.append(qid)
                if len(out) >= room:
                    break
        return out

    # -- deferred/ ------------------------------------------------------------------

    async def promoter(self) -> None:
        """Move due deferred mail to active/. A pass stats every message in deferred/, so
        it runs only when something there can be due (the earliest next attempt the last
        pass saw has come, or deferred/ changed since), and reading deferred/ takes at
        most DEFERRED_PASS_SHARE of the time (moving due mail is work, not counted)."""
        loop = asyncio.get_running_loop()
        while True:
            rest = self.settings.scan_interval
            try:
                if self.deferred_may_be_due():
                    started = time.monotonic()
                    moved, moving = await asyncio.to_thread(self.promote_due, loop)
                    took = time.monotonic() - started
                    rest = max(rest, (took - moving) * (1 / DEFERRED_PASS_SHARE - 1))
                    if moved:
                        event(log, "deferred_due", moved=moved, seconds=round(took, 3))
            except OSError as exc:
                event(log, "scan_error", level=logging.ERROR, error=str(exc))
            await asyncio.sleep(rest)

    def deferred_may_be_due(self) -> bool:
        if self.clock() >= self.next_due:
            return True
        return os.stat(self.spool.dir(State.DEFERRED)).st_mtime_ns != self._deferred_seen

    def promote_due(self, loop: asyncio.AbstractEventLoop | None = None) -> tuple[int, float]:
        """One pass over deferred/ (in a thread): due messages to active/, the scanner
        told on `loop` after each batch; notes the earliest next attempt left. Returns the
        count moved and the seconds spent moving them."""
        seen = os.stat(self.spool.dir(State.DEFERRED))
        settled = time.time() - seen.st_mtime > MTIME_SETTLE
        now = self.clock()
        later = math.inf
        batch: list[str] = []
        moved, moving = 0, 0.0
        for qid, at in self.spool.next_attempts(State.DEFERRED):
            if self.gate.stopping:
                return moved, moving
            if not self.owns(qid):
                continue  # another worker's partition (relay.ops.workers)
            if at > now:
                later = min(later, at)
                continue
            batch.append(qid)
            if len(batch) >= ACTIVATE_BATCH:
                n, took = self._activate(batch, loop)
                moved, moving, batch = moved + n, moving + took, []
        n, took = self._activate(batch, loop)
        self.next_due = later
        self._deferred_seen = seen.st_mtime_ns if settled else None
        return moved + n, moving + took

    def _activate(self, qids: list[str], loop: asyncio.AbstractEventLoop | None
                  ) -> tuple[int, float]:
        """Move a batch to active/ and tell the scanner; the count moved, and how long."""
        started = time.monotonic()
        moved = len(self.spool.activate(qids)) if qids else 0
        if moved and loop is not None:
            loop.call_soon_threadsafe(self.rescan.set)
        return moved, time.monotonic() - started
