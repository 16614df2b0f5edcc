"""The message log: one row per message and recipient, and what became of it.

Writes the `messages` table: a "queued" row per recipient once ingress has committed the
message (read from the spool), then every delivery outcome (the pool's Listener port),
batched by one writer task so delivery never waits for a commit (the spool stays the
record of truth); SES feedback updates rows too (relay.feedback). Reads it and
`feedback_events` for `relay log ADDRESS` and the guard. Rows older than
database.retention are pruned. Built by relay.service; read by relay.feedback_cli.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any, Awaitable, Callable, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.db import LOCK_SES_MESSAGE, Database, FeedbackEvent, MessageRow, xact_lock
from relay.log import event
from relay.spool import Record, Spool
from relay.suppression import normalize

log = logging.getLogger("relay.tracking")

#: One queued write: runs inside the writer's transaction.
Op = Callable[[AsyncConnection, list[tuple[str, str, list[str]]]], Awaitable[None]]
#: How long the writer gathers writes before one commit.
BATCH_WINDOW = 0.05

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


@functools.cache
def upsert_queued(dialect: str) -> Any:
    """INSERT of queued rows that leaves an existing row's status alone (SQLite, PostgreSQL)."""
    from sqlalchemy.dialects import postgresql, sqlite

    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(MessageRow)
    return stmt.on_conflict_do_update(
        index_elements=[MessageRow.queue_id, MessageRow.recipient],
        set_={"message_id_header": stmt.excluded.message_id_header},
        where=MessageRow.message_id_header == "",
    )


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
        #: once start()ed, writes are queued and committed in batches by one writer task
        self._ops: asyncio.Queue[Op] | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- the writer -------------------------------------------------------------------

    async def start(self) -> None:
        """Batch writes: delivery never waits for a commit (the spool is the record)."""
        self._ops = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="message-log")

    async def stop(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self._ops is not None and self._writer is not None:
            await self._ops.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._ops = self._writer = None

    async def flush(self) -> None:
        if self._ops is not None:
            await self._ops.join()

    async def _submit(self, op: Op) -> None:
        if self._ops is not None:
            self._ops.put_nowait(op)
        else:
            await self._commit([op])

    async def _write_loop(self) -> None:
        assert self._ops is not None
        while True:
            batch = [await self._ops.get()]
            await asyncio.sleep(BATCH_WINDOW)
            while not self._ops.empty() and len(batch) < 500:
                batch.append(self._ops.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - the log must never stop delivery
                event(log, "log_error", level=logging.WARNING, error=str(exc), rows=len(batch))
            finally:
                for _ in batch:
                    self._ops.task_done()

    async def _commit(self, batch: list[Op]) -> None:
        try:
            async with self.db.engine.begin() as s:
                sent: list[tuple[str, str, list[str]]] = []
                for op in batch:
                    await op(s, sent)
                await self._early_feedback(s, sent)
            return
        except IntegrityError:
            pass  # another writer (a second relay, a race) added a row: one at a time
        for op in batch:
            for attempt in range(3):
                try:
                    async with self.db.engine.begin() as s:
                        sent = []
                        await op(s, sent)
                        await self._early_feedback(s, sent)
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise

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
        now = time.time()

        rows = [{"queue_id": qid, "recipient": r, "message_id_header": header,
                 "status": "queued", "attempts": 0, "created_at": now, "updated_at": now}
                for r in rcpts]

        async def op(s: AsyncConnection, sent: list[tuple[str, str, list[str]]]) -> None:
            # an outcome may have been written first: keep it, fill in the header
            await s.execute(upsert_queued(s.dialect.name), rows)

        await self._submit(op)

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
        values: dict[str, Any] = {"updated_at": now}
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
        qid = record.id

        async def op(s: AsyncConnection, sent: list[tuple[str, str, list[str]]]) -> None:
            if ses_message_id:  # ordered with feedback for the same SES message
                await xact_lock(s, LOCK_SES_MESSAGE, ses_message_id)
            res = await s.execute(update(MessageRow).where(
                MessageRow.queue_id == qid, MessageRow.recipient.in_(rcpts),
            ).values(**values))
            if res.rowcount < len(rcpts):  # type: ignore[attr-defined]
                have = set(await s.scalars(select(MessageRow.recipient).where(
                    MessageRow.queue_id == qid, MessageRow.recipient.in_(rcpts))))
                new = [self._row(qid, r, values, status or "queued", now)
                       for r in rcpts if r not in have]
                if new:
                    await s.execute(insert(MessageRow), new)
            if ses_message_id:
                sent.append((qid, ses_message_id, rcpts))

        await self._submit(op)

    @staticmethod
    async def _early_feedback(s: AsyncConnection, sent: list[tuple[str, str, list[str]]]) -> None:
        """Feedback that arrived before a row knew its SES MessageId still counts."""
        if not sent:
            return
        qids = {(ses_id, rcpt): qid for qid, ses_id, rcpts in sent for rcpt in rcpts}
        events = await s.execute(select(FeedbackEvent.ses_message_id, FeedbackEvent.recipient,
                                        FeedbackEvent.kind, FeedbackEvent.detail).where(
            FeedbackEvent.ses_message_id.in_({ses_id for _, ses_id, _ in sent}),
        ).order_by(FeedbackEvent.id))
        latest = {(i, r): (EVENT_STATUS[k], d) for i, r, k, d in events
                  if k in EVENT_STATUS and (i, r) in qids}
        for (ses_id, rcpt), (status, detail) in latest.items():
            extra = {} if status == "delivered" else {"last_error": detail}
            await s.execute(update(MessageRow).where(
                MessageRow.queue_id == qids[ses_id, rcpt], MessageRow.recipient == rcpt,
            ).values(status=status, **extra))

    @staticmethod
    def _row(qid: str, rcpt: str, values: dict[str, Any], status: str,
             now: float) -> dict[str, Any]:
        row: dict[str, Any] = {"queue_id": qid, "recipient": rcpt, "status": status,
                               "created_at": now, "attempts": 1 if "attempts" in values else 0}
        row.update((k, v) for k, v in values.items() if k != "attempts")
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
