"""Applies parsed SES feedback to the database, one transaction per notification.

Reads what a decision needs (was the notification seen, the recipient's transient-bounce
count), asks relay.feedback.decisions, and has each table's one writer in relay.store
record it: feedback_events, messages, suppressions, bounce_counts. A second copy changes
nothing. Called by relay.feedback.sqs, relay.feedback.sns and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from relay.feedback.decisions import COUNTED, decide
from relay.feedback.parse import IGNORED, Event, Notification, events
from relay.store import feedback_events
from relay.store.db import Database
from relay.store.messages import record_feedback
from relay.store.suppression import bounce_count, normalize, set_bounce_count, suppress


@dataclass
class Applied:
    """What apply() did with one notification."""

    #: applied, duplicate (seen before) or ignored (a type that carries nothing)
    outcome: str
    #: the addresses a permanent bounce, complaint or the soft-bounce limit suppressed
    suppressed: list[str] = field(default_factory=list)
    #: the events recorded (one per recipient)
    events: int = 0


class FeedbackApplier:
    """Applies notifications to the database, one transaction each."""

    def __init__(self, db: Database, *, soft_bounce_limit: int = 3) -> None:
        self.db = db
        self.soft_bounce_limit = soft_bounce_limit

    async def apply(self, n: Notification, *, now: float | None = None) -> Applied:
        """Record the notification and its effects; raises Unparseable when a known type
        lacks its fields (nothing is written then)."""
        if n.kind in IGNORED:
            return Applied("ignored")
        todo = events(n)
        return await self._apply(n, todo, time.time() if now is None else now)

    async def _apply(self, n: Notification, todo: list[Event], now: float) -> Applied:
        async with self.db.session.begin() as s:
            if await feedback_events.seen(s, n.key):
                return Applied("duplicate")
            result = Applied("applied")
            for e in todo:
                addr = normalize(e.recipient)
                if await self._one(s, n, e, addr, now):
                    result.suppressed.append(addr)
                result.events += 1
            await s.flush()
        return result

    async def _one(self, s: AsyncSession, n: Notification, e: Event, addr: str,
                   now: float) -> bool:
        """Apply one recipient's event; True when it suppressed the address."""
        feedback_events.record(s, key=n.key, recipient=addr, kind=e.kind,
                               ses_message_id=n.ses_message_id, detail=e.detail,
                               occurred_at=e.at, received_at=now)
        await record_feedback(s, ses_message_id=n.ses_message_id, recipient=addr,
                              kind=e.kind, detail=e.detail, now=now)
        bounces = await bounce_count(s, addr) if e.kind in COUNTED else 0
        decision = decide(e.kind, detail=e.detail, bounces=bounces,
                          soft_bounce_limit=self.soft_bounce_limit)
        if decision.bounces is not None:
            await set_bounce_count(s, addr, decision.bounces, now=now)
        if not decision.suppress:
            return False
        await suppress(s, addr, reason=decision.suppress, source="ses", detail=decision.detail,
                       now=now)
        return True
