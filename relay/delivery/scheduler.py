"""The scheduler: which queued messages the workers take next.

Keeps a bounded ready queue per lane of queue ids read from active/ (each claimed once, so
no two workers hold one message), oldest due first; a worker takes from the lane that
relay.delivery.lanes.choose names (weighted fair share, rate caps, quota shares). Filled
when the ingress tells of new mail, when due mail was promoted, and every scan_interval.
Mail known to be in active/ beyond a full ready queue waits in memory, per lane and
oldest due first (at most WAITING_MAX), and refills the ready queue once workers have
drained it to half: a backlog costs no read of active/ per arrival. Only a lane with more
mail in active/ than that (a large spool at start, more than WAITING_MAX queued) is read
again, once it has nothing waiting. The
promoter moves due mail from deferred/ back to active/ (a rename; the next attempt is the
mtime) in batches, reading deferred/ only when something there can be due. Reads active/
and deferred/; renames deferred/ -> active/. Built and started by the delivery pool.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import math
import os
import time
from collections.abc import Callable

from relay.config_lanes import LanesConfig
from relay.delivery.account import Gate
from relay.delivery.lanes import LaneBook, LaneView, ReadyLanes, choose, quota_ok
from relay.delivery.ratelimit import Quota
from relay.delivery.settings import PoolSettings
from relay.errors import SpoolError
from relay.log import event
from relay.spool.reading import CorruptMessage
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")

#: A pass over deferred/ stats every message there; reading it takes at most this share
#: of the time (with a million deferred, one pass reads for seconds).
DEFERRED_PASS_SHARE = 0.1
#: Due deferred messages moved back to active/ per fsync of active/.
ACTIVATE_BATCH = 256
#: Per lane, queue ids kept in memory beyond the ready queue (about 200 bytes each).
WAITING_MAX = 10_000
#: A directory modified this recently may change again within the same timestamp tick,
#: leaving its mtime as it was: such an mtime is not trusted to mean "unchanged".
MTIME_SETTLE = 1.0


def arrival(qid: str) -> float:
    """A queue id's arrival time (its first 13 hex digits are microseconds)."""
    try:
        return int(qid[:13], 16) / 1e6
    except ValueError:
        return 0.0


class Scheduler:
    def __init__(self, *, spool: Spool, gate: Gate, settings: PoolSettings,
                 clock: Callable[[], float], lanes: LanesConfig | None = None,
                 quota: Quota | None = None) -> None:
        self.spool = spool
        self.gate = gate
        self.settings = settings
        self.owns = settings.partition.owns
        self.clock = clock
        self.book = LaneBook(lanes or LanesConfig())
        #: the 24-hour quota left (the account watch sets it, attempts take from it)
        self.quota = quota or Quota()
        #: each lane's ready mail, at most ready_queue messages per lane
        self.ready = ReadyLanes(self.book.names, settings.ready_queue)
        #: queue ids in the ready queue or held by a worker
        self.claimed: set[str] = set()
        #: queue id -> (lane, due, recipients) of mail seen in active/ (no second read)
        self.known: dict[str, tuple[str, float, int]] = {}
        #: queue id -> (lane, recipients) of mail a worker holds
        self.held: dict[str, tuple[str, int]] = {}
        #: recipients taken by workers and not yet released (quota shares count them)
        self.outstanding = 0
        self.rescan = asyncio.Event()
        #: workers waiting in take(), oldest first: a signal wakes one, not all of them
        #: (with every worker woken, each would build the lane views for one message)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: per lane, mail in active/ beyond its ready queue, oldest due first (as in ready)
        self.waiting: dict[str, list[tuple[float, str, int]]] = {
            name: [] for name in self.book.names}
        self.waiting_ids: set[str] = set()
        self.waiting_max = WAITING_MAX
        #: lanes whose mail in active/ is not all in the ready queue or waiting: read
        #: active/ again once the lane has nothing waiting
        self._partial: set[str] = set()
        #: arrivals not remembered because their lane was partial (see fill())
        self._skipped = 0
        #: the earliest next attempt the last pass over deferred/ left there (0: unknown)
        self.next_due = 0.0
        #: deferred/'s mtime when that pass began, if settled (see MTIME_SETTLE)
        self._deferred_seen: int | None = None
        #: lane -> why the reputation guard holds it (its mail stays queued)
        self.lane_holds: dict[str, str] = {}
        #: lane -> recipients it may still send before more outcomes are known (absent:
        #: no limit); set by the reputation guard, taken from by pick()
        self.allowance: dict[str, int] = {}
        #: lane -> recipients taken since start (the guard's allowance counts from it)
        self.picked: dict[str, int] = dict.fromkeys(self.book.names, 0)

    # -- the workers' side ----------------------------------------------------------

    def notify(self, qid: str, envelope: Envelope | None = None) -> None:
        """A message was just queued in active/ (the ingress, a DSN)."""
        if self.gate.stopping or qid in self.claimed:
            return
        if envelope is None:
            self.rescan.set()
            return
        info = (self.book.lane(envelope.lane), arrival(qid), len(envelope.recipients))
        self.known[qid] = info
        self._queue(qid, info)

    def _queue(self, qid: str, info: tuple[str, float, int]) -> None:
        """Into the lane's ready queue, else into its waiting list; left for a later read
        of active/ when the lane is partial (older mail there goes first) or waiting is
        full."""
        if self._push(qid, info):
            return
        lane, due, n = info
        if lane in self._partial or len(self.waiting[lane]) >= self.waiting_max:
            self._partial.add(lane)
            self._skipped += 1
            return
        heapq.heappush(self.waiting[lane], (due, qid, n))
        self.waiting_ids.add(qid)

    def _push(self, qid: str, info: tuple[str, float, int]) -> bool:
        lane, due, n = info
        woke = not self.ready.heaps[lane]
        if not self.ready.push(lane, due, qid, n):
            return False
        if woke:
            self.book.woke(lane, self.ready.busy())
        self.claimed.add(qid)
        self._signal()
        return True

    def _signal(self) -> None:
        """Wake one worker waiting in take(): a lane may be able to send. The one woken
        passes the turn on if more mail is ready once it has taken its message."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake(self) -> None:
        """Read active/ again now (e.g. on resume: mail was left there while paused)."""
        self.rescan.set()

    # -- the reputation guard's side ------------------------------------------------

    def hold_lane(self, lane: str, reason: str) -> None:
        """Send nothing more of `lane` (its mail stays queued); other lanes keep going."""
        self.lane_holds[lane] = reason

    def release_lane(self, lane: str) -> None:
        if self.lane_holds.pop(lane, None) is not None:
            self._signal()

    def allow(self, lane: str, n: int | None, *, picked_before: int) -> None:
        """`lane` may send n more recipients counted from when it had taken
        `picked_before` (None: no limit)."""
        if n is None:
            self.allowance.pop(lane, None)
        else:
            self.allowance[lane] = n - (self.picked.get(lane, 0) - picked_before)
        self._signal()

    def in_flight(self) -> dict[str, int]:
        """lane -> recipients taken and not released yet (being sent, or just sent)."""
        out: dict[str, int] = {}
        for lane, n in self.held.values():
            out[lane] = out.get(lane, 0) + n
        return out

    def lane_open(self, lane: str) -> bool:
        """Not held by the guard, and not past its allowance."""
        return lane not in self.lane_holds and self.allowance.get(lane, 1) > 0

    async def take(self) -> str:
        """The next claimed queue id, from the lane choose() names; release() it when
        done with it."""
        while True:
            qid = self.pick(time.monotonic())
            if qid is not None:
                if self.ready.busy():
                    self._signal()  # more mail ready: the next waiting worker's turn
                return qid
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                # not wait_for: it can swallow a cancellation that meets the set_result()
                async with asyncio.timeout(self._idle_wait()):
                    await waiter
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._signal()  # woken, then stopped: the wake-up goes to another
                raise

    def pick(self, now: float) -> str | None:
        """Take the next message of the lane choose() names, charging that lane."""
        quota = self.quota
        views = [
            LaneView(name, ready=bool(n) and self.lane_open(name), vtime=self.book.vtime[name],
                     free_at=self.book.free_at[name],
                     quota_ok=quota_ok(share=self.book.cfg.get(name).quota_share, n=n,
                                       remaining=quota.remaining, max_24h=quota.max_24h,
                                       outstanding=self.outstanding))
            for name in self.book.names for n in (self.ready.peek(name),)
        ]
        lane = choose(views, now)
        if lane is None:
            return None
        qid, n = self.ready.pop(lane)
        self.book.charge(lane, n, now)
        self.picked[lane] = self.picked.get(lane, 0) + n
        if lane in self.allowance:
            self.allowance[lane] -= n
        self.held[qid] = (lane, n)
        self.outstanding += n
        self.taken(lane)
        return qid

    def _idle_wait(self) -> float:
        """How long take() sleeps when no lane may send: until a rate cap frees, at most
        a second (the 24-hour quota changes with the account's)."""
        now = time.monotonic()
        waits = [t - now for name, t in self.book.free_at.items()
                 if t > now and self.ready.heaps[name]]
        return max(0.001, min([1.0, *waits]))

    def release(self, qid: str) -> None:
        self.claimed.discard(qid)
        self.known.pop(qid, None)
        _, n = self.held.pop(qid, ("", 0))
        if n:
            self.outstanding -= n
            self._signal()

    def taken(self, lane: str) -> None:
        """A message left the ready queue: once the lane is down to half, refill it from
        the mail waiting in memory; a partial lane with none left has active/ read again."""
        if self.ready.room(lane) < self.ready.capacity // 2:
            return
        heap = self.waiting[lane]
        while heap and self.ready.room(lane) > 0:
            due, qid, n = heapq.heappop(heap)
            self.waiting_ids.discard(qid)
            if qid not in self.claimed:
                self._push(qid, (lane, due, n))
        if not heap and lane in self._partial:
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
        names = self.book.names
        if any(self.ready.room(name) for name in names):
            rooms = {name: self.ready.room(name) + self.waiting_max - len(self.waiting[name])
                     for name in names}
            skipped = self._skipped
            found, more = await asyncio.to_thread(self.unclaimed, rooms, dict(self.known))
            # a lane read whole is no longer partial, unless an arrival was left out
            # meanwhile (the read may have missed it)
            partial = more | (self._partial if self._skipped != skipped else set())
            self._partial = set()  # what was found is the oldest: it all goes in
            for qid, info in found:
                if qid not in self.claimed and qid not in self.waiting_ids:
                    self.known[qid] = info
                    self._queue(qid, info)
            self._partial |= partial
        self._signal()

    def unclaimed(self, rooms: dict[str, int], known: dict[str, tuple[str, float, int]]
                  ) -> tuple[list[tuple[str, tuple[str, float, int]]], set[str]]:
        """(In a thread.) For each lane, up to its room of the queue ids in active/ that
        no worker holds or waits for and that are not waiting in memory, earliest due
        first (arrival, or the next attempt of mail back from deferred/); and the lanes
        that had more than their room."""
        by_lane: dict[str, list[tuple[float, str, tuple[str, float, int]]]] = {}
        for qid in self.spool.scan(State.ACTIVE):
            if qid in self.claimed or qid in self.waiting_ids or not self.owns(qid):
                continue
            info = known.get(qid) or self._read(qid)
            if info is not None:
                by_lane.setdefault(info[0], []).append((info[1], qid, info))
        out = []
        more = set()
        for lane, items in by_lane.items():
            room = rooms.get(lane, 0)
            if len(items) > room:
                more.add(lane)
            for _, qid, info in heapq.nsmallest(room, items):
                out.append((qid, info))
        return out, more

    def _read(self, qid: str) -> tuple[str, float, int] | None:
        try:
            record = self.spool.load(State.ACTIVE, qid)
        except CorruptMessage as exc:
            # not a message (moved to corrupt/ with its reason): said once, here
            event(log, "corrupt", level=logging.ERROR, queue_id=qid, error=str(exc))
            return None
        except (OSError, SpoolError):
            return None  # gone meanwhile
        env = record.envelope
        return (self.book.lane(env.lane), max(arrival(qid), record.next_attempt),
                len(env.recipients))

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
