"""The reputation guard: pauses delivery before SES does.

Reads rolling rates: permanent bounces and complaints (feedback_events) against recipients
SES accepted (messages.sent_at) in feedback.reputation_window. Above a max rate, with
feedback.min_sample sent, it pauses the pool (mail stays queued) until `relay resume`:
request_resume() writes relay_state (its one writer), polled here; only later feedback
counts. Built by relay.service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from relay.log import event
from relay.store.db import Database, FeedbackEvent, MessageRow, StateRow

log = logging.getLogger("relay.guard")

RESUMED_AT = "resumed_at"
REASON_PREFIX = "reputation:"


@dataclass(frozen=True)
class Rates:
    sent: int
    bounces: int
    complaints: int

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sent if self.sent else 0.0


def verdict(rates: Rates, *, max_bounce_rate: float, max_complaint_rate: float,
            min_sample: int) -> str:
    """The pause reason, or "" when the rates are acceptable (pure: tested by table)."""
    if rates.sent < min_sample:
        return ""
    if rates.bounce_rate > max_bounce_rate:
        return (f"{REASON_PREFIX} bounce rate {rates.bounce_rate:.4f} above {max_bounce_rate} "
                f"({rates.bounces} bounces / {rates.sent} sent)")
    if rates.complaint_rate > max_complaint_rate:
        return (f"{REASON_PREFIX} complaint rate {rates.complaint_rate:.4f} above "
                f"{max_complaint_rate} ({rates.complaints} complaints / {rates.sent} sent)")
    return ""


async def read_state(db: Database, key: str) -> str:
    async with db.session() as s:
        row = await s.get(StateRow, key)
        return row.value if row is not None else ""


async def write_state(db: Database, key: str, value: str) -> None:
    async with db.session.begin() as s:
        row = await s.get(StateRow, key)
        if row is None:
            s.add(StateRow(key=key, value=value, updated_at=time.time()))
        else:
            row.value, row.updated_at = value, time.time()


async def request_resume(db: Database, *, now: float | None = None) -> None:
    """Ask every relay on this database to resume (and forget feedback before now)."""
    await write_state(db, RESUMED_AT, repr(time.time() if now is None else now))


class ReputationGuard:
    def __init__(
        self,
        *,
        db: Database,
        pause: Callable[[str], None],
        resume: Callable[[], None],
        paused_reason: Callable[[], str],
        max_bounce_rate: float = 0.04,
        max_complaint_rate: float = 0.0008,
        min_sample: int = 200,
        window: float = 86400.0,
        interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.pause = pause
        self.resume = resume
        self.paused_reason = paused_reason
        self.max_bounce_rate = max_bounce_rate
        self.max_complaint_rate = max_complaint_rate
        self.min_sample = min_sample
        self.window = window
        self.interval = interval
        self.clock = clock
        self.resumed_at = 0.0
        self.last = Rates(0, 0, 0)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def rates(self) -> Rates:
        since = max(self.clock() - self.window, self.resumed_at)
        async with self.db.session() as s:
            sent = await s.scalar(select(func.count()).select_from(MessageRow).where(
                MessageRow.sent_at.is_not(None), MessageRow.sent_at >= since))
            counts = dict((await s.execute(
                select(FeedbackEvent.kind, func.count()).where(
                    FeedbackEvent.received_at >= since,
                    FeedbackEvent.kind.in_(("bounce", "complaint")))
                .group_by(FeedbackEvent.kind))).tuples().all())
        return Rates(int(sent or 0), int(counts.get("bounce", 0)),
                     int(counts.get("complaint", 0)))

    async def check(self) -> str:
        """Look at the resume flag and the rates once; pause if needed; the reason or ""."""
        flag = await read_state(self.db, RESUMED_AT)
        if flag and float(flag) > self.resumed_at:
            self.resumed_at = float(flag)
            if self.paused_reason().startswith(REASON_PREFIX):
                event(log, "resumed_by_operator")
                self.resume()
        self.last = await self.rates()
        reason = verdict(self.last, max_bounce_rate=self.max_bounce_rate,
                         max_complaint_rate=self.max_complaint_rate,
                         min_sample=self.min_sample)
        if reason and not self.paused_reason():
            event(log, "reputation_pause", level=logging.ERROR, reason=reason,
                  sent=self.last.sent, bounces=self.last.bounces,
                  complaints=self.last.complaints, hint="investigate, then: relay resume")
            self.pause(reason)
        return reason

    def kick(self) -> None:
        """Feedback arrived: check now rather than at the next interval."""
        self._kick.set()

    async def start(self) -> None:
        # a resume from before this start is history, not a request to this process
        flag = await read_state(self.db, RESUMED_AT)
        self.resumed_at = float(flag) if flag else 0.0
        await self.check()
        self._task = asyncio.create_task(self._run(), name="reputation-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - the guard must keep watching
                event(log, "guard_error", level=logging.WARNING, error=str(exc))
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval)
            except TimeoutError:
                pass
            self._kick.clear()

