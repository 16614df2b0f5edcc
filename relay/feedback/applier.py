"""Applies parsed SES feedback to the database: a batch of notifications per transaction.

Reads what the decisions need with set-based queries (which identity keys were seen, the
transient-bounce counts, the suppressions of every recipient of the batch), asks
relay.feedback.decisions per event, and has each table's one writer in relay.store write
in bulk: feedback_events, messages (its status change from relay.store.transitions),
suppressions, bounce_counts. A second copy of an event, in this batch or an earlier one,
changes nothing. Called by relay.feedback.sqs, relay.feedback.sns and tests.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from relay.feedback.decisions import COUNTED, decide
from relay.feedback.parse import IGNORED, Event, Notification, events, identity
from relay.store import feedback_events
from relay.store.db import Database
from relay.store.messages import record_feedback_many
from relay.store.suppression import bounce_counts, normalize, set_bounce_counts, suppress_many

#: What apply_batch() says about one notification.
APPLIED, DUPLICATE, IGNORED_OUTCOME = "applied", "duplicate", "ignored"


@dataclass
class Applied:
    """What apply() did with one notification."""

    #: applied, duplicate (every event seen before) or ignored (a type that carries nothing)
    outcome: str
    #: the addresses a permanent bounce, complaint or the soft-bounce limit suppressed
    suppressed: list[str] = field(default_factory=list)
    #: the events recorded (one per recipient)
    events: int = 0


@dataclass(frozen=True)
class AppliedEvent:
    """One event a committed batch recorded, for the hook and the metrics."""

    kind: str
    recipient: str
    ses_message_id: str
    #: SES's timestamp of the event
    at: float


@dataclass
class AppliedBatch:
    """What one committed transaction applied: handed to the on_batch hook (the guard)."""

    #: when the transaction committed
    applied_at: float
    #: per notification of the batch, in order: applied, duplicate or ignored
    outcomes: list[str] = field(default_factory=list)
    #: the events recorded (duplicates left out)
    events: list[AppliedEvent] = field(default_factory=list)
    #: the addresses suppressed by this batch (normalized, in order)
    suppressed: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(e.kind for e in self.events)

    @property
    def recipients(self) -> list[str]:
        return [e.recipient for e in self.events]

    @property
    def ses_message_ids(self) -> list[str]:
        return sorted({e.ses_message_id for e in self.events if e.ses_message_id})

    def lags(self) -> list[float]:
        """Seconds from each event's SES timestamp to the commit."""
        return [max(0.0, self.applied_at - e.at) for e in self.events]


@dataclass(frozen=True)
class _New:
    """An event of the batch not seen before, with its normalized address and key."""

    note: int
    event: Event
    ses_message_id: str
    address: str
    key: str


class FeedbackApplier:
    """Applies notifications to the database, one transaction per batch."""

    def __init__(self, db: Database, *, soft_bounce_limit: int = 3) -> None:
        self.db = db
        self.soft_bounce_limit = soft_bounce_limit

    async def apply(self, n: Notification, *, now: float | None = None) -> Applied:
        """Record one notification and its effects; raises Unparseable when a known type
        lacks its fields (nothing is written then)."""
        todo = events(n)
        batch = await self.apply_batch([(n, todo)], now=now)
        addresses = {normalize(e.recipient) for e in todo}
        return Applied(batch.outcomes[0],
                       [a for a in batch.suppressed if a in addresses], len(batch.events))

    async def apply_batch(self, notes: Sequence[tuple[Notification, list[Event]]], *,
                          now: float | None = None) -> AppliedBatch:
        """Record every notification's events (from parse.events()) and their effects in
        one transaction; the caller has left out what did not parse."""
        now = time.time() if now is None else now
        batch = AppliedBatch(applied_at=now)
        todo = [_New(i, e, n.ses_message_id, addr, identity(
                    e.kind, recipient=addr, ses_message_id=n.ses_message_id,
                    feedback_id=e.feedback_id, at=e.at))
                for i, (n, evts) in enumerate(notes) if n.kind not in IGNORED
                for e in evts for addr in (normalize(e.recipient),)]
        fresh: list[_New] = []
        if todo:
            async with self.db.session.begin() as s:
                seen = await feedback_events.seen(s, {(t.key, t.address) for t in todo})
                for t in todo:
                    if (t.key, t.address) not in seen:
                        seen.add((t.key, t.address))  # a copy inside the batch counts once
                        fresh.append(t)
                await self._write(s, fresh, batch, now)
            batch.applied_at = time.time()
        recorded = {t.note for t in fresh}
        batch.outcomes = [IGNORED_OUTCOME if n.kind in IGNORED else
                          APPLIED if i in recorded or not evts else DUPLICATE
                          for i, (n, evts) in enumerate(notes)]
        return batch

    async def _write(self, s: AsyncSession, fresh: list[_New], batch: AppliedBatch,
                     now: float) -> None:
        """The batch's new events and their effects, through each table's writer."""
        counts = await bounce_counts(s, {t.address for t in fresh if t.event.kind in COUNTED})
        changed: dict[str, int] = {}
        listed: list[tuple[str, str, str]] = []
        for t in fresh:
            e = t.event
            decision = decide(e.kind, detail=e.detail, bounces=counts.get(t.address, 0),
                              soft_bounce_limit=self.soft_bounce_limit)
            if decision.bounces is not None:
                counts[t.address] = changed[t.address] = decision.bounces
            if decision.suppress:
                listed.append((t.address, decision.suppress, evidence(t, decision.detail)))
            batch.events.append(AppliedEvent(e.kind, t.address, t.ses_message_id, e.at))
        await feedback_events.record_many(s, [
            {"event_key": t.key, "recipient": t.address, "kind": t.event.kind,
             "ses_message_id": t.ses_message_id, "detail": t.event.detail,
             "occurred_at": t.event.at, "received_at": now} for t in fresh])
        await record_feedback_many(s, [(t.ses_message_id, t.address, t.event.kind,
                                        t.event.detail) for t in fresh], now=now)
        await set_bounce_counts(s, changed, now=now)
        await suppress_many(s, listed, source="ses", now=now)
        batch.suppressed = list(dict.fromkeys(a for a, _, _ in listed))


def evidence(t: _New, detail: str) -> str:
    """The suppression's detail: the decision's, and which SES event decided it."""
    which = f"feedbackId {t.event.feedback_id}" if t.event.feedback_id else \
        f"SES message {t.ses_message_id}"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.event.at))
    return f"{detail} (SES {t.event.kind} {stamp}, {which})"

