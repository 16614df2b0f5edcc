"""The message log: one row per message and recipient, and what became of it.

Writes the `messages` table: a "queued" row per recipient once ingress has committed the
message (read from the spool), then every delivery outcome (the pool's Listener port),
then SES feedback (relay.feedback). Reads it and `feedback_events` for `relay log
ADDRESS` and for the reputation guard's rates. Old rows are pruned after
database.retention. Built by relay.service; read by relay.cli.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from relay.db import Database, FeedbackEvent, MessageRow
from relay.spool import Record, Spool
from relay.suppression import normalize

log = logging.getLogger("relay.tracking")

#: Delivery outcome kind -> message log status (None: keep the status, note the error).
STATUS_OF = {
    "sent": "sent",
    "suppressed": "suppressed",
    "rejected": "failed",
    "failed": "failed",
    "expired": "failed",
    "deferred": "deferred",
    "throttled": None,
    "held": None,
}

#: Feedback event kind -> the message log status it sets (relay.feedback writes both).
EVENT_STATUS = {
    "bounce": "bounced",
    "soft-bounce": "bounced",
    "complaint": "complained",
    "delivery": "delivered",
    "reject": "failed",
    "rendering-failure": "failed",
}


def message_id_header(data: bytes) -> str:
    """The Message-ID header of raw MIME (headers only are parsed)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 2]
    value = BytesHeaderParser().parsebytes(head).get("Message-ID", "")
    return str(value).strip()[:998]


@dataclass(frozen=True)
class LogLine:
    """One line of `relay log ADDRESS`: a message row or a feedback event."""

    at: float
    kind: str  # "message" or "event"
    status: str
    queue_id: str
    ses_message_id: str
    detail: str


class MessageLog:
    """Implements relay.delivery.Listener; also writes queued rows and answers lookups."""

    def __init__(self, db: Database, *, spool: Spool | None = None) -> None:
        self.db = db
        self.spool = spool

    # -- writes ---------------------------------------------------------------------

    async def queued(self, qid: str) -> None:
        """Write a "queued" row per recipient of a message just committed to the spool."""
        if self.spool is None:
            return
        loaded = await asyncio.to_thread(self._read, qid)
        if loaded is None:
            return  # already delivered and gone: its outcome rows exist
        record, header = loaded
        rcpts = list(dict.fromkeys(normalize(r) for r in record.envelope.recipients))
        for _ in range(3):
            now = time.time()
            try:
                async with self.db.session.begin() as s:
                    # an outcome may have been written first: keep it, fill in the header
                    await s.execute(update(MessageRow).where(
                        MessageRow.queue_id == qid, MessageRow.message_id_header == "",
                    ).values(message_id_header=header))
                    have = set(await s.scalars(select(MessageRow.recipient).where(
                        MessageRow.queue_id == qid)))
                    s.add_all([MessageRow(queue_id=qid, recipient=r, message_id_header=header,
                                          status="queued", attempts=0, created_at=now,
                                          updated_at=now) for r in rcpts if r not in have])
                return
            except IntegrityError:
                continue  # an outcome row landed meanwhile: look again

    def _read(self, qid: str) -> tuple[Record, str] | None:
        assert self.spool is not None
        state = self.spool.locate(qid)
        if state is None:
            return None
        try:
            record = self.spool.load(state, qid)
            path = self.spool.path(state, qid) / "message.eml"
            with open(path, "rb") as fh:
                head = fh.read(64 * 1024)
        except (OSError, ValueError):
            return None
        return record, message_id_header(head)

    async def outcome(self, kind: str, record: Record, recipients: Sequence[str], *,
                      ses_message_id: str = "", error: str = "") -> None:
        status = STATUS_OF.get(kind)
        now = time.time()
        values: dict[str, object] = {"updated_at": now}
        if status is not None:
            values["status"] = status
        if ses_message_id:
            values["ses_message_id"] = ses_message_id
        if kind == "sent":
            values["sent_at"] = now
            values["last_error"] = ""
        elif error:
            values["last_error"] = error[:2000]
        if kind in ("sent", "rejected"):
            values["attempts"] = MessageRow.attempts + 1
        elif kind == "deferred":
            values["attempts"] = record.attempts
        rcpts = list(dict.fromkeys(normalize(r) for r in recipients))
        for _ in range(3):
            try:
                async with self.db.session.begin() as s:
                    res = await s.execute(update(MessageRow).where(
                        MessageRow.queue_id == record.id, MessageRow.recipient.in_(rcpts),
                    ).values(**values))
                    if res.rowcount < len(rcpts):  # type: ignore[attr-defined]
                        have = set(await s.scalars(select(MessageRow.recipient).where(
                            MessageRow.queue_id == record.id, MessageRow.recipient.in_(rcpts))))
                        s.add_all([self._row(record.id, r, values, status or "queued", now)
                                   for r in rcpts if r not in have])
                    if ses_message_id:
                        await self._early_feedback(s, record.id, ses_message_id, rcpts)
                return
            except IntegrityError:
                continue  # the queued rows landed meanwhile: update them

    @staticmethod
    async def _early_feedback(s: AsyncSession, qid: str, ses_id: str, rcpts: list[str]) -> None:
        """Feedback that arrived before this row knew its SES MessageId still counts."""
        events = await s.execute(select(FeedbackEvent.recipient, FeedbackEvent.kind,
                                        FeedbackEvent.detail).where(
            FeedbackEvent.ses_message_id == ses_id, FeedbackEvent.recipient.in_(rcpts),
        ).order_by(FeedbackEvent.id))
        latest = {r: (EVENT_STATUS[k], d) for r, k, d in events if k in EVENT_STATUS}
        for rcpt, (status, detail) in latest.items():
            extra = {} if status == "delivered" else {"last_error": detail}
            await s.execute(update(MessageRow).where(
                MessageRow.queue_id == qid, MessageRow.recipient == rcpt,
            ).values(status=status, **extra))

    @staticmethod
    def _row(qid: str, rcpt: str, values: dict[str, object], status: str,
             now: float) -> MessageRow:
        row = MessageRow(queue_id=qid, recipient=rcpt, status=status, created_at=now,
                         updated_at=now, attempts=1 if "attempts" in values else 0)
        for key, value in values.items():
            if key != "attempts":
                setattr(row, key, value)
        return row

    async def prune(self, retention: float, *, now: float | None = None) -> int:
        """Delete message rows and events older than `retention` seconds."""
        cutoff = (time.time() if now is None else now) - retention
        async with self.db.session.begin() as s:
            res = await s.execute(delete(MessageRow).where(MessageRow.updated_at < cutoff))
            await s.execute(delete(FeedbackEvent).where(FeedbackEvent.received_at < cutoff))
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # -- reads ----------------------------------------------------------------------

    async def history(self, address: str) -> list[LogLine]:
        """Every message row and feedback event for an address, newest first."""
        addr = normalize(address)
        async with self.db.session() as s:
            msgs = await s.scalars(select(MessageRow).where(MessageRow.recipient == addr))
            evts = await s.scalars(select(FeedbackEvent).where(FeedbackEvent.recipient == addr))
            lines = [
                LogLine(m.updated_at, "message", m.status, m.queue_id, m.ses_message_id,
                        "; ".join(x for x in (f"Message-ID {m.message_id_header}"
                                              if m.message_id_header else "",
                                              f"attempts {m.attempts}",
                                              m.last_error) if x))
                for m in msgs
            ] + [
                LogLine(e.occurred_at, "event", e.kind, "", e.ses_message_id, e.detail)
                for e in evts
            ]
        return sorted(lines, key=lambda x: x.at, reverse=True)

    async def rows(self, address: str) -> list[MessageRow]:
        async with self.db.session() as s:
            res = await s.scalars(select(MessageRow).where(
                MessageRow.recipient == normalize(address)).order_by(MessageRow.id))
            return list(res)

    async def sent_since(self, since: float) -> int:
        """Recipients SES accepted since `since` (the reputation guard's denominator)."""
        async with self.db.session() as s:
            n = await s.scalar(select(func.count()).select_from(MessageRow).where(
                MessageRow.sent_at.is_not(None), MessageRow.sent_at >= since))
        return int(n or 0)
