"""Read-only lookups for the console: message-log search, a message's rows and feedback,
sends per minute, feedback lag, pages of the suppression list with the event behind each.

Reads messages, feedback_events and suppressions; writes nothing (each table keeps its one
writer). Every query is bounded (LIMIT, an indexed column or a time window). Called by
relay.ops.console.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Integer, cast, func, or_, select

from relay.store.db import Database, FeedbackEvent, MessageRow, Suppression
from relay.store.suppression import Entry, normalize

#: rows a search shows at most
LIMIT = 200


@dataclass(frozen=True)
class Row:
    """One message-log row (a message and one recipient)."""

    queue_id: str
    recipient: str
    message_id_header: str
    ses_message_id: str
    status: str
    attempts: int
    last_error: str
    created_at: float
    updated_at: float
    sent_at: float | None


@dataclass(frozen=True)
class Event:
    """One stored SES feedback event."""

    kind: str
    recipient: str
    ses_message_id: str
    detail: str
    occurred_at: float
    received_at: float


@dataclass(frozen=True)
class Suppressed:
    entry: Entry
    #: the latest bounce or complaint stored for the address (the likely cause), if any
    cause: Event | None = None


def _row(m: MessageRow) -> Row:
    return Row(m.queue_id, m.recipient, m.message_id_header, m.ses_message_id, m.status,
               m.attempts, m.last_error, m.created_at, m.updated_at, m.sent_at)


def _event(e: FeedbackEvent) -> Event:
    return Event(e.kind, e.recipient, e.ses_message_id, e.detail, e.occurred_at,
                 e.received_at)


def search_terms(q: str) -> dict[str, str]:
    """Which column a search term can be: an address, a Message-ID header (<...>), an SES
    MessageId or a queue id (pure; tested by table)."""
    q = q.strip()
    if not q:
        return {}
    if q.startswith("<") and q.endswith(">") and "@" in q:
        return {"message_id_header": q}
    if "@" in q:
        return {"recipient": normalize(q), "message_id_header": f"<{q}>"}
    return {"ses_message_id": q, "queue_id": q.upper() if len(q) == 18 else q}


async def search(db: Database, q: str, *, limit: int = LIMIT) -> list[Row]:
    """Message rows whose recipient, Message-ID, SES MessageId or queue id is q; newest first."""
    terms = search_terms(q)
    if not terms:
        return []
    cols = {"recipient": MessageRow.recipient, "queue_id": MessageRow.queue_id,
            "ses_message_id": MessageRow.ses_message_id,
            "message_id_header": MessageRow.message_id_header}
    where = or_(*(cols[k] == v for k, v in terms.items()))
    async with db.session() as s:
        rows = await s.scalars(select(MessageRow).where(where)
                               .order_by(MessageRow.updated_at.desc()).limit(limit))
        return [_row(m) for m in rows]


async def message(db: Database, queue_id: str) -> tuple[list[Row], list[Event]]:
    """A queue id's rows, and the feedback events for its SES MessageIds (oldest first)."""
    async with db.session() as s:
        rows = [_row(m) for m in await s.scalars(
            select(MessageRow).where(MessageRow.queue_id == queue_id)
            .order_by(MessageRow.recipient).limit(LIMIT))]
        ids = {r.ses_message_id for r in rows if r.ses_message_id}
        events = [_event(e) for e in await s.scalars(
            select(FeedbackEvent).where(FeedbackEvent.ses_message_id.in_(ids))
            .order_by(FeedbackEvent.occurred_at).limit(LIMIT))] if ids else []
    return rows, events


async def events_for(db: Database, ses_message_ids: list[str]) -> dict[str, list[Event]]:
    """Feedback events by SES MessageId (the sandbox page's "what it produced")."""
    if not ses_message_ids:
        return {}
    out: dict[str, list[Event]] = {}
    async with db.session() as s:
        for e in await s.scalars(select(FeedbackEvent).where(
                FeedbackEvent.ses_message_id.in_(ses_message_ids))
                .order_by(FeedbackEvent.occurred_at)):
            out.setdefault(e.ses_message_id, []).append(_event(e))
    return out


async def sent_per_minute(db: Database, *, now: float | None = None,
                          minutes: int = 60) -> list[int]:
    """Recipients SES accepted in each of the last `minutes` minutes, oldest first."""
    now = time.time() if now is None else now
    since = now - minutes * 60
    # updated_at >= sent_at always: the indexed column narrows, sent_at decides
    minute = cast(func.floor((MessageRow.sent_at - since) / 60), Integer) \
        if db.engine.dialect.name == "postgresql" \
        else cast((MessageRow.sent_at - since) / 60, Integer)
    async with db.session() as s:
        got = await s.execute(select(minute, func.count()).where(
            MessageRow.updated_at >= since, MessageRow.sent_at >= since,
            MessageRow.sent_at < now).group_by(minute))
        counts = [0] * minutes
        for m, n in got:
            if m is not None and 0 <= int(m) < minutes:
                counts[int(m)] += int(n)
    return counts


async def latest_event(db: Database) -> Event | None:
    """The feedback event received last (for the feedback lag), or None."""
    async with db.session() as s:
        e = await s.scalar(select(FeedbackEvent).order_by(
            FeedbackEvent.received_at.desc()).limit(1))
        return _event(e) if e is not None else None


async def suppressions(db: Database, *, q: str = "", after: str = "",
                       limit: int = 100) -> list[Suppressed]:
    """A page of the suppression list in address order: containing q, after `after`; each
    with the latest bounce or complaint stored for it."""
    stmt = select(Suppression)
    if q:
        stmt = stmt.where(Suppression.address.contains(q.strip().lower(), autoescape=True))
    if after:
        stmt = stmt.where(Suppression.address > after)
    async with db.session() as s:
        rows = list(await s.scalars(stmt.order_by(Suppression.address).limit(limit)))
        causes: dict[str, Event] = {}
        if rows:
            for e in await s.scalars(select(FeedbackEvent).where(
                    FeedbackEvent.recipient.in_([r.address for r in rows]),
                    FeedbackEvent.kind.in_(("bounce", "complaint", "soft-bounce")))
                    .order_by(FeedbackEvent.received_at)):
                causes[e.recipient] = _event(e)
    return [Suppressed(Entry(r.address, r.reason, r.source, r.detail, r.created_at,
                             r.updated_at), causes.get(r.address)) for r in rows]
