"""The delivery pool: workers that take ready messages and run one attempt each.

Builds the parts in dependency order (the gate, the scheduler, the account watch, the
outcomes, the attempt), starts their loops and the workers, and stops them. Concurrency
follows Little's law (calls in flight = rate x latency), capped by max_concurrency. Owns
no spool state of its own: the scheduler reads active/ and deferred/, the attempt and its
outcomes write them. Imports no transport: the Sender and AccountSource ports are
implemented by relay.ses.client. Built by relay.service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from relay.delivery.account import BY_SES, AccountWatch, Gate
from relay.delivery.attempt import Attempt
from relay.delivery.outcomes import Outcomes
from relay.delivery.ports import Account, AccountSource, Listener, Sender, Suppressions
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.scheduler import Scheduler
from relay.delivery.settings import PoolSettings
from relay.delivery.unsaved import Unsaved
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.record import Record
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")

#: the loops that take new work; stopped first, so in-flight calls can finish
FEEDERS = ("scanner", "promoter", "account")


class DeliveryPool:
    def __init__(
        self,
        *,
        spool: Spool,
        sender: Sender,
        accounts: AccountSource,
        limiter: RateLimiter,
        policy: RetryPolicy,
        settings: PoolSettings | None = None,
        suppressions: Suppressions | None = None,
        listeners: Sequence[Listener] = (),
        on_failed: Callable[[Record, str], Awaitable[None]] | None = None,
        commit: GroupCommit | None = None,
        scheduler: Scheduler | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.settings = settings = settings or PoolSettings()
        self.limiter = limiter
        #: spool flushes shared with concurrent calls (and the ingress, when given its)
        self.commit = commit or GroupCommit(spool)
        # the scheduler may be built first, so that whoever queues mail can notify it
        self.scheduler = scheduler or Scheduler(spool=spool, gate=Gate(), settings=settings,
                                                clock=clock)
        self.gate = self.scheduler.gate
        #: the 24-hour quota, shared with the scheduler (lanes with a quota share)
        self.quota = self.scheduler.quota
        self.watch = AccountWatch(accounts=accounts, limiter=limiter, quota=self.quota,
                                  gate=self.gate, settings=settings,
                                  on_resume=self.scheduler.wake)
        #: results the spool could not record, kept until it can (delivery held meanwhile)
        self.unsaved = Unsaved(spool=spool, commit=self.commit, gate=self.gate,
                               on_saved=self.scheduler.wake, retry=settings.scan_interval)
        outcomes = Outcomes(spool=spool, commit=self.commit, policy=policy,
                            unsaved=self.unsaved, listeners=listeners, on_failed=on_failed,
                            clock=clock)
        self.attempt = Attempt(spool=spool, sender=sender, limiter=limiter, quota=self.quota,
                               policy=policy, gate=self.gate, pause=self.watch.pause,
                               outcomes=outcomes, settings=settings,
                               on_retry=self.scheduler.wake,
                               suppressions=suppressions, clock=clock)
        self._inflight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        self._slot_freed = asyncio.Condition()

    # -- control --------------------------------------------------------------------

    def notify(self, qid: str) -> None:
        """A message was just queued in active/ (called by ingress)."""
        self.scheduler.notify(qid)

    @property
    def paused(self) -> bool:
        return self.gate.paused

    @property
    def paused_reason(self) -> str:
        return self.gate.reason

    @property
    def pauses(self) -> dict[str, str]:
        """Who paused delivery (BY_SES, BY_REPUTATION) -> why, for /readyz and metrics."""
        return dict(self.gate.pauses)

    @property
    def holds(self) -> list[str]:
        """Why the relay itself holds delivery (spool cannot record results, database
        cannot answer), for /readyz; empty when it does not."""
        return list(self.gate.holds.values())

    @property
    def account(self) -> Account | None:
        return self.watch.account

    @property
    def latency(self) -> float:
        return self.attempt.latency

    def pause(self, reason: str, *, by: str = BY_SES) -> None:
        self.watch.pause(reason, by=by)

    def resume(self, *, by: str = BY_SES) -> None:
        self.watch.resume(by=by)

    async def refresh_account(self) -> None:
        await self.watch.refresh()

    async def start(self) -> None:
        await self.watch.refresh()
        self._tasks = [
            asyncio.create_task(self.scheduler.scanner(), name="scanner"),
            asyncio.create_task(self.scheduler.promoter(), name="promoter"),
            asyncio.create_task(self.watch.run(), name="account"),
            asyncio.create_task(self.unsaved.run(), name="unsaved"),
            *(
                asyncio.create_task(self._worker(), name=f"worker-{i}")
                for i in range(self.settings.max_concurrency)
            ),
        ]

    async def stop(self, timeout: float) -> None:
        """Stop taking messages; let in-flight ones finish within `timeout` seconds."""
        self.gate.stop()
        for task in self._tasks:
            if task.get_name() in FEEDERS:
                task.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=timeout)
        if not await self.unsaved.save_all():
            self.unsaved.lost()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inflight:
            event(log, "shutdown_abandoned", level=logging.WARNING, inflight=len(self._inflight))

    # -- workers --------------------------------------------------------------------

    @property
    def target_concurrency(self) -> int:
        """Little's law: calls in flight = rate x latency, with headroom, capped by config."""
        rate = self.limiter.rate(time.monotonic())
        need = math.ceil(rate * self.attempt.latency * 1.5) + 2
        return max(1, min(self.settings.max_concurrency, need))

    async def _worker(self) -> None:
        while True:
            await self.gate.wait_unpaused()
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._busy < self.target_concurrency)
                self._busy += 1
            try:
                await self._take_one()
            finally:
                async with self._slot_freed:
                    self._busy -= 1
                    # one slot freed: wake one waiter, not every idle worker
                    self._slot_freed.notify(1)

    async def _take_one(self) -> None:
        while True:
            qid = await self.scheduler.take()
            if self.gate.closed:
                self.scheduler.release(qid)
                continue
            # shielded: a stop lets the call in flight finish and record its result
            task = asyncio.create_task(self.attempt.run(qid))
            self._inflight.add(task)
            try:
                await asyncio.shield(task)
            finally:
                self._inflight.discard(task)
                self.scheduler.release(qid)
            return
