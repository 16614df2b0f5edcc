"""Scheduling on a large spool: passes over deferred/ only when something can be due,
due mail back to active/ in batches, and the ready queue refilled without a busy loop.

The pool here is built on a real spool but never sends: these tests drive its scanning
steps directly (the sender and account source raise if called). The whole path, from a
spool left by a stopped relay to mail at the sandbox, is the last test.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

import pytest

from relay.delivery.pool import DeliveryPool
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.scheduler import ACTIVATE_BATCH, Scheduler
from relay.delivery.settings import PoolSettings
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
from tests.conftest import wait_for

ENV = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=1000.0)


class NeverCalled:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} called: these tests never send")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool", fsync=False)
    s.ensure()
    return s


def pool_on(spool: Spool, clock: Clock, ready_queue: int = 1000) -> Scheduler:
    """The scheduler of a pool that never sends."""
    pool = DeliveryPool(spool=spool, sender=NeverCalled(), accounts=NeverCalled(),
                        limiter=RateLimiter(10.0), policy=RetryPolicy(), clock=clock,
                        settings=PoolSettings(ready_queue=ready_queue))
    return pool.scheduler


def deferred(spool: Spool, when: float) -> str:
    qid = spool.accept(ENV, b"Subject: x\r\n\r\nx\r\n")
    spool.move(qid, State.ACTIVE, State.DEFERRED, when=when)
    return qid


def settle(spool: Spool) -> None:
    """Date deferred/ back, as if nothing had changed there for a minute."""
    old = time.time() - 60
    os.utime(spool.dir(State.DEFERRED), (old, old))


def test_a_pass_moves_due_mail_and_notes_the_earliest_next_attempt_left(spool):
    due, soon, later = deferred(spool, 100.0), deferred(spool, 200.0), deferred(spool, 300.0)
    pool = pool_on(spool, Clock(150.0))
    assert pool.promote_due()[0] == 1
    assert list(spool.scan(State.ACTIVE)) == [due]
    assert sorted(spool.scan(State.DEFERRED)) == sorted([soon, later])
    assert pool.next_due == 200.0


async def test_due_mail_beyond_one_batch_is_all_moved_and_the_scanner_told(spool):
    n = ACTIVATE_BATCH * 2 + 7
    for _ in range(n):
        deferred(spool, 100.0)
    pool = pool_on(spool, Clock(150.0))
    loop = asyncio.get_running_loop()
    assert (await asyncio.to_thread(pool.promote_due, loop))[0] == n
    assert pool.rescan.is_set()
    assert sum(1 for _ in spool.scan(State.ACTIVE)) == n
    assert list(spool.scan(State.DEFERRED)) == []
    assert pool.next_due == math.inf


def test_quiet_deferred_is_not_read_again_until_its_next_attempt(spool):
    deferred(spool, 200.0)
    deferred(spool, 300.0)
    clock = Clock(150.0)
    pool = pool_on(spool, clock)
    settle(spool)
    pool.promote_due()
    assert not pool.deferred_may_be_due()
    clock.now = 199.9
    assert not pool.deferred_may_be_due()
    clock.now = 200.0
    assert pool.deferred_may_be_due()


def test_mail_deferred_after_a_pass_brings_the_next_pass(spool):
    deferred(spool, 1000.0)
    pool = pool_on(spool, Clock(150.0))
    settle(spool)
    pool.promote_due()
    assert not pool.deferred_may_be_due()
    # e.g. another relay process deferring mail for a second after a throttle
    deferred(spool, 151.0)
    assert pool.deferred_may_be_due()


def test_a_recently_changed_deferred_dir_is_read_again(spool):
    # changed within the same timestamp tick, a later rename would leave the mtime alone
    deferred(spool, 1000.0)
    pool = pool_on(spool, Clock(150.0))
    pool.promote_due()
    assert pool.deferred_may_be_due()


def test_a_pass_stops_when_the_pool_stops(spool):
    qid = deferred(spool, 100.0)
    pool = pool_on(spool, Clock(150.0))
    pool.gate.stop()
    assert pool.promote_due()[0] == 0
    assert list(spool.scan(State.DEFERRED)) == [qid]


class CountingSpool(Spool):
    """A real spool that counts the reads of active/."""

    scans = 0
    #: called once a read of active/ has listed it (a message arriving just too late)
    after_scan: Any = None

    def scan(self, state: State):  # type: ignore[no-untyped-def]
        if state is State.ACTIVE:
            self.scans += 1
        yield from super().scan(state)
        if state is State.ACTIVE and self.after_scan is not None:
            hook, self.after_scan = self.after_scan, None
            hook()


@pytest.fixture
def counting(tmp_path):
    s = CountingSpool(tmp_path / "spool", fsync=False)
    s.ensure()
    return s


def drain(pool: Scheduler) -> list[str]:
    """Take every ready message, one at a time, and finish it as workers would."""
    taken: list[str] = []
    while True:
        qid = pool.pick(0.0)
        if qid is None:
            return taken
        taken.append(qid)
        pool.spool.remove(State.ACTIVE, qid)
        pool.release(qid)


async def test_a_full_ready_queue_is_refilled_from_memory_when_half_drained(counting):
    ids = {counting.accept(ENV, b"m") for _ in range(10)}
    pool = pool_on(counting, Clock(150.0), ready_queue=4)
    await pool.fill()
    assert pool.ready.qsize() == 4 and counting.scans == 1
    assert not pool.rescan.is_set()  # a full queue does not ask for another scan
    taken = [pool.pick(0.0)]
    assert pool.ready.qsize() == 3
    taken.append(pool.pick(0.0))
    assert pool.ready.qsize() == 4  # half drained: refilled from what the scan found
    taken += drain(pool)
    assert sorted(taken) == sorted(ids)  # each once, in arrival order
    assert taken == sorted(taken)
    assert counting.scans == 1 and not pool.rescan.is_set()


async def test_arrivals_behind_a_full_ready_queue_cost_no_read_of_active(counting):
    """The newsletter backlog: while a lane's ready queue is full, each new message is
    remembered, not a new read of active/ (which holds the whole backlog)."""
    pool = pool_on(counting, Clock(150.0), ready_queue=4)
    backlog = [counting.accept(ENV, b"m") for _ in range(50)]
    await pool.fill()
    arrivals = []
    for _ in range(30):
        qid = counting.accept(ENV, b"m")
        pool.notify(qid, ENV)
        arrivals.append(qid)
    assert not pool.rescan.is_set() and counting.scans == 1
    taken = drain(pool)
    assert taken == backlog + arrivals  # oldest first, each once
    assert counting.scans == 1 and not pool.rescan.is_set()


async def test_a_lane_with_more_than_memory_holds_is_read_again_in_order(counting):
    """More mail in active/ than the ready queue and the waiting list hold: arrivals
    meanwhile are left to the next read, and everything still goes oldest first."""
    pool = pool_on(counting, Clock(150.0), ready_queue=4)
    pool.waiting_max = 3
    backlog = [counting.accept(ENV, b"m") for _ in range(20)]
    await pool.fill()
    assert pool.ready.qsize() == 4 and len(pool.waiting_ids) == 3
    taken = [pool.pick(0.0), pool.pick(0.0)]  # two of the waiting refill the ready queue
    for qid in taken:
        counting.remove(State.ACTIVE, qid)
        pool.release(qid)
    assert len(pool.waiting_ids) == 1
    arrivals = []
    for _ in range(5):
        qid = counting.accept(ENV, b"m")
        pool.notify(qid, ENV)
        arrivals.append(qid)
    assert len(pool.waiting_ids) == 1  # partial lane: older mail in active/ goes first
    while len(taken) < 25:
        taken += drain(pool)
        if pool.rescan.is_set():
            pool.rescan.clear()
            await pool.fill()
    assert taken == backlog + arrivals
    assert 1 < counting.scans <= 1 + 25 // 3  # read again per waiting list drained, not per message


def test_next_attempts_and_activate(spool):
    a, b = deferred(spool, 100.0), deferred(spool, 200.0)
    assert dict(spool.next_attempts()) == {a: 100.0, b: 200.0}
    assert list(spool.due(150.0)) == [a]
    spool.discard(State.DEFERRED, b)  # gone meanwhile: skipped
    assert spool.activate([a, b]) == [a]
    assert list(spool.scan(State.ACTIVE)) == [a]
    assert list(spool.scan(State.DEFERRED)) == []


def test_a_restarted_relay_sends_active_and_due_mail_and_keeps_the_rest(
        start_relay, sandbox, tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure()
    now = time.time()
    sent = [spool.accept(Envelope("a@example.com", (f"active{i}@example.net",), now), b"m")
            for i in range(3)]
    for i in range(3):
        qid = spool.accept(Envelope("a@example.com", (f"due{i}@example.net",), now), b"m")
        spool.move(qid, State.ACTIVE, State.DEFERRED, when=now - 60)
        sent.append(qid)
    later = []
    for i in range(3):
        qid = spool.accept(Envelope("a@example.com", (f"later{i}@example.net",), now), b"m")
        spool.move(qid, State.ACTIVE, State.DEFERRED, when=now + 3600)
        later.append(qid)
    relay = start_relay(sandbox.url, delivery={"ready_queue": 2})
    wait_for(lambda: sandbox.state.recipients_sent() >= 6)
    assert wait_for(lambda: relay.find("deferred_due"))["moved"] == 3
    got = sorted(r for c in sandbox.state.accepted() for r in c.recipients)
    assert got == sorted([f"active{i}@example.net" for i in range(3)]
                         + [f"due{i}@example.net" for i in range(3)])
    wait_for(lambda: relay.queued("active") == [])
    assert relay.queued("deferred") == sorted(later)
    assert relay.stop() == 0


async def test_an_arrival_a_read_of_active_missed_is_not_forgotten(counting):
    """A message queued behind a full ready queue while a partial lane's read of active/
    runs, after that read listed the directory: the lane stays partial, so a later read
    finds it."""
    pool = pool_on(counting, Clock(150.0), ready_queue=2)
    pool.waiting_max = 2
    backlog = [counting.accept(ENV, b"m") for _ in range(6)]
    await pool.fill()  # 2 ready, 2 waiting, 2 left in active/: partial
    taken = [pool.pick(0.0), pool.pick(0.0)]  # the waiting two refill the ready queue
    for qid in taken:
        counting.remove(State.ACTIVE, qid)
        pool.release(qid)
    assert pool.rescan.is_set() and pool.ready.qsize() == 2
    pool.rescan.clear()
    late: list[str] = []

    def arrive() -> None:
        late.append(counting.accept(ENV, b"m"))
        pool.notify(late[-1], ENV)  # ready queue full, lane partial: left to a read

    counting.after_scan = arrive
    await pool.fill()  # finds the 2 left (all fit), not the late one
    assert late and late[0] not in pool.waiting_ids
    while True:
        taken += drain(pool)
        if not pool.rescan.is_set():
            break
        pool.rescan.clear()
        await pool.fill()
    assert taken == backlog + late
