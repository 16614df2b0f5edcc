"""The message log: one row per message and recipient, and what became of it.

The one writer of `messages`: "queued" rows once ingress committed a message, delivery
outcomes (the pool's Listener port) batched by relay.store.log_writer (retried until the
database takes them), and SES feedback through record_feedback_many() in the applier's
transaction. Reads feedback_events for `relay log`; prunes both after database.retention.
Built by relay.service.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from relay.spool.record import Envelope, Record
from relay.spool.spool import Spool
from relay.store import feedback_events
from relay.store.db import (
    LOCK_SES_MESSAGE,
    Database,
    FeedbackEvent,
    MessageRow,
    Suppression,
    xact_lock,
    xact_lock_sync,
)
from relay.store.log_writer import BatchWriter, retryable
from relay.store.suppression import normalize
from relay.store.transitions import KEEPS, after_feedback, after_outcome, attempts_of

log = logging.getLogger("relay.tracking")

#: Seconds stop() waits for the database to take what is queued.
STOP_TIMEOUT = 10.0


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


@functools.cache
def upsert_outcome(dialect: str, keys: tuple[str, ...], attempts: str) -> Any:
    """INSERT of outcome rows that updates `keys` of a row already there.

    attempts: "add" counts one more attempt, "set" takes the record's count (bound as
    set_attempts), "" leaves it alone. A new row gets 1 attempt or 0 (see outcome()).
    """
    from sqlalchemy.dialects import postgresql, sqlite

    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(MessageRow)
    set_: dict[str, Any] = {k: stmt.excluded[k] for k in keys}
    if attempts == "add":
        set_["attempts"] = MessageRow.attempts + 1
    elif attempts == "set":
        set_["attempts"] = bindparam("set_attempts")
    return stmt.on_conflict_do_update(
        index_elements=[MessageRow.queue_id, MessageRow.recipient], set_=set_)


@dataclass(frozen=True)
class Write:
    """One queued write: rows for one statement, applied inside the writer's transaction.

    Consecutive writes of the same statement go to the database as one executemany.
    """

    #: ("queued",) or ("outcome", attempts mode, *columns set on an existing row)
    statement: tuple[str, ...]
    rows: list[dict[str, Any]]
    #: an SES MessageId: feedback for it is ordered after this commit (PostgreSQL)
    ses_message_id: str = ""
    #: (queue id, SES MessageId, recipients) of a sent call, for early feedback
    sent: tuple[str, str, list[str]] | None = None
    #: the lane of a sent call's rows (counted in MessageLog.unlogged until committed)
    lane: str = ""

    def compiled(self, dialect: str) -> Any:
        if self.statement[0] == "queued":
            return upsert_queued(dialect)
        return upsert_outcome(dialect, self.statement[2:], self.statement[1])


#: A Message-ID header line; only trusted when every line before it is a plain header line
_MESSAGE_ID = re.compile(rb"^message-id:([^\n]*)$", re.IGNORECASE | re.MULTILINE)
_HEADER_LINES = re.compile(rb"(?:(?:[\041-\071\073-\176]*:|[\t ])[^\n]*\n)*")


def _plain_message_id(head: bytes) -> str | None:
    """The Message-ID of a plain ASCII header block without the email parser, or None
    when the block has anything the parser might read differently."""
    m = _MESSAGE_ID.search(head)
    if (m is None or not head.isascii() or head.count(b"\r") != head.count(b"\r\n")
            or head[m.end() + 1:m.end() + 2] in (b" ", b"\t")  # folded onto the next line
            or not _HEADER_LINES.fullmatch(head, 0, m.start())):
        return None
    return m.group(1).decode("ascii").strip()[:998]


def message_id_header(data: bytes) -> str:
    """The Message-ID header of raw MIME (headers only are parsed)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 2]
    plain = _plain_message_id(head)
    if plain is not None:
        return plain
    value = BytesHeaderParser().parsebytes(head).get("Message-ID", "")
    return str(value).strip()[:998]


async def record_feedback_many(session: AsyncSession,
                               events: Sequence[tuple[str, str, str, str]], *,
                               now: float) -> None:
    """Apply a batch of (SES MessageId, recipient, kind, detail) events, in order, to their
    rows inside the feedback applier's transaction (relay.store.transitions.after_feedback
    says what each changes).

    A row's changes are folded first (a later event's columns win, as they would applied
    one after the other); then one executemany per set of columns changed. A row not yet
    known by its SES MessageId is caught up by the log writer when it records the send
    (_early_feedback); the locks order the two on PostgreSQL.
    """
    changes: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for ses_id, rcpt, kind, detail in events:
        change = after_feedback(kind, detail)
        if change is None or not ses_id:
            continue
        # in order per row; an event may not replace what an earlier one set (KEEPS)
        earlier = changes.get((ses_id, rcpt))
        if earlier is not None and earlier[1].get("status") in KEEPS.get(kind, ()):
            continue
        changes[ses_id, rcpt] = (kind, {**(earlier[1] if earlier else {}), **change})
    for ses_id in sorted({s for s, _ in changes}):
        await xact_lock(session, LOCK_SES_MESSAGE, ses_id)
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for (ses_id, rcpt), (kind, change) in changes.items():
        groups.setdefault((kind, tuple(sorted(change))), []).append(
            {"k_sid": ses_id, "k_rcpt": rcpt, **change})
    table: Any = MessageRow.__table__
    for (kind, columns), params in groups.items():
        await session.execute(update(table).where(
            table.c.ses_message_id == bindparam("k_sid"),
            table.c.recipient == bindparam("k_rcpt"),
            # KEEPS holds constants: written as literals, as executemany takes no IN list
            *(table.c.status != literal_column(f"'{status}'") for status in KEEPS.get(kind, ())),
        ).values({**{c: bindparam(c) for c in columns}, "updated_at": now}), params)


def _apply(conn: Connection, batch: list[Write]) -> None:
    """The writes in order, "queued" rows first; runs of the same statement as one
    executemany each; then the early feedback of the calls sent.

    A queued row leaves a row already there alone and an outcome inserts a missing one,
    so moving the queued rows ahead changes no row; it keeps a busy relay's batch, where
    messages are queued and sent in turn, at two statements instead of one per write.
    """
    queued = [op for op in batch if op.statement[0] == "queued"]
    if queued and len(queued) < len(batch):
        batch = queued + [op for op in batch if op.statement[0] != "queued"]
    dialect = conn.dialect.name
    sent: list[tuple[str, str, list[str]]] = []
    run: list[dict[str, Any]] = []
    last: Write | None = None
    for op in batch:
        if last is not None and op.statement != last.statement:
            # executemany applies its rows in order, as the writes came
            conn.execute(last.compiled(dialect), run)
            run = []
        if op.ses_message_id:  # ordered with feedback for the same SES message
            xact_lock_sync(conn, LOCK_SES_MESSAGE, op.ses_message_id)
        run += op.rows
        if op.sent is not None:
            sent.append(op.sent)
        last = op
    if last is not None and run:
        conn.execute(last.compiled(dialect), run)
    _early_feedback(conn, sent)


#: The events of a batch's sent calls (built once: a statement per batch cost more to
#: build and key for the cache than to run)
_EARLY_EVENTS = select(FeedbackEvent.ses_message_id, FeedbackEvent.recipient, FeedbackEvent.kind,
                       FeedbackEvent.detail).where(FeedbackEvent.ses_message_id.in_(
                           bindparam("ids", expanding=True))).order_by(FeedbackEvent.id)


def _early_feedback(s: Connection, sent: list[tuple[str, str, list[str]]]) -> None:
    """Feedback that arrived before a row knew its SES MessageId still counts."""
    if not sent:
        return
    qids = {(ses_id, rcpt): qid for qid, ses_id, rcpts in sent for rcpt in rcpts}
    events = s.execute(_EARLY_EVENTS, {"ids": sorted({ses_id for _, ses_id, _ in sent})})
    # the latest event that changes the row wins, as it would have arriving later
    # (unless it may not replace what an earlier one set: KEEPS)
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for i, r, k, d in events:
        change = after_feedback(k, d)
        if change is None or (i, r) not in qids:
            continue
        if latest.get((i, r), {}).get("status") not in KEEPS.get(k, ()):
            latest[i, r] = change
    for (ses_id, rcpt), change in latest.items():
        s.execute(update(MessageRow).where(
            MessageRow.queue_id == qids[ses_id, rcpt], MessageRow.recipient == rcpt,
        ).values(**change))


@dataclass(frozen=True)
class LogLine:
    """One line of `relay log ADDRESS`: a message row or a feedback event."""

    at: float
    kind: str  # "message", "event" or "suppression" (when and by which event it was listed)
    status: str
    queue_id: str
    ses_message_id: str
    detail: str


class MessageLog:
    """Implements relay.delivery.ports.Listener; also writes queued rows and answers lookups."""

    def __init__(self, db: Database, *, spool: Spool | None = None) -> None:
        self.db = db
        self.spool = spool
        #: once start()ed, writes are queued and committed in batches (relay.store.log_writer)
        self.writer: BatchWriter | None = None
        #: lane -> recipients sent (SES accepted) whose rows are not committed yet
        self._unlogged: dict[str, int] = {}

    # -- the writer -------------------------------------------------------------------

    async def start(self) -> None:
        """Batch writes: delivery never waits for a commit (the spool is the record)."""
        self.writer = BatchWriter(self._commit)
        self.writer.start()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Commit what is queued (waiting at most `timeout` for the database), then stop."""
        if self.writer is not None:
            await self.writer.stop(timeout)
            self.writer = None

    async def flush(self) -> None:
        if self.writer is not None:
            await self.writer.flush()

    def problem(self) -> str:
        """Why the log cannot write (for /readyz), or ""."""
        return self.writer.problem() if self.writer is not None else ""

    async def _submit(self, op: Write, *, may_wait: bool = True) -> None:
        if self.writer is not None:
            await self.writer.submit(op, len(op.rows), may_wait=may_wait)
        else:
            await self._commit([op])

    def unlogged(self) -> dict[str, int]:
        """lane -> sends SES accepted whose rows are not committed yet (the reputation
        guard charges them to the lane's allowance: its counts cannot see them)."""
        return {lane: n for lane, n in self._unlogged.items() if n}

    def _logged(self, batch: Sequence[Write]) -> None:
        for op in batch:
            if op.sent is not None and op.lane:
                self._unlogged[op.lane] -= len(op.sent[2])

    async def _commit(self, batch: list[Write]) -> None:
        try:
            await self._commit_batch(batch)
        except Exception as exc:
            if len(batch) == 1 and not retryable(exc):
                self._logged(batch)  # refused for good: never tried again
            raise
        self._logged(batch)

    async def _commit_batch(self, batch: list[Write]) -> None:
        """The batch in one transaction (on SQLite one hand-off to the database's thread
        for all of it: relay.store.thread_engine)."""
        try:
            await self.db.transaction(_apply, batch)
            return
        except IntegrityError:
            pass  # another writer (a second relay, a race) added a row: one at a time
        for op in batch:
            for attempt in range(3):
                try:
                    await self.db.transaction(_apply, [op])
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise

    # -- writes ---------------------------------------------------------------------

    async def queued(self, qid: str, *, envelope: Envelope | None = None,
                     head: bytes | None = None) -> None:
        """Write a "queued" row per recipient of a message just committed to the spool.

        The ingress passes the envelope and the message's first bytes; otherwise (sendmail,
        DSNs) they are read back from the spool.
        """
        if envelope is not None and head is not None:
            header = message_id_header(head)
        else:
            if self.spool is None:
                return
            loaded = await asyncio.to_thread(self._read, qid)
            if loaded is None:
                return  # already delivered and gone: its outcome rows exist
            record, header = loaded
            envelope = record.envelope
        rcpts = list(dict.fromkeys(normalize(r) for r in envelope.recipients))
        now = time.time()

        rows = [{"queue_id": qid, "recipient": r, "message_id_header": header,
                 "lane": envelope.lane, "status": "queued", "attempts": 0, "created_at": now,
                 "updated_at": now}
                for r in rcpts]

        # an outcome may have been written first: the upsert keeps it, fills in the header
        await self._submit(Write(("queued",), rows), may_wait=False)

    def _read(self, qid: str) -> tuple[Record, str] | None:
        assert self.spool is not None
        state = self.spool.locate(qid)
        if state is None:
            return None
        try:
            record = self.spool.load(state, qid)
            head = self.spool.read_head(state, qid, 64 * 1024)
        except (OSError, ValueError):
            return None
        return record, message_id_header(head)

    async def outcome(self, kind: str, record: Record, recipients: Sequence[str], *,
                      ses_message_id: str = "", error: str = "") -> None:
        now = time.time()
        values = after_outcome(kind, ses_message_id=ses_message_id, error=error, now=now)
        attempts = attempts_of(kind)
        rcpts = list(dict.fromkeys(normalize(r) for r in recipients))
        qid = record.id
        # a row not there yet (no queued row) is inserted: status or "queued", 1 attempt
        # for an outcome that counts attempts, else 0
        rows = [{"queue_id": qid, "recipient": r, "created_at": now, **values,
                 "lane": record.envelope.lane,
                 "status": values.get("status", "queued"), "attempts": 1 if attempts else 0}
                for r in rcpts]
        if attempts == "set":
            for row in rows:
                row["set_attempts"] = record.attempts
        lane = record.envelope.lane if ses_message_id else ""
        if lane:
            self._unlogged[lane] = self._unlogged.get(lane, 0) + len(rcpts)
        await self._submit(Write(
            ("outcome", attempts, *values), rows, ses_message_id,
            (qid, ses_message_id, rcpts) if ses_message_id else None, lane))

    async def prune(self, retention: float, *, now: float | None = None) -> int:
        """Delete message rows and events older than `retention` seconds."""
        cutoff = (time.time() if now is None else now) - retention
        async with self.db.session.begin() as s:
            res = await s.execute(delete(MessageRow).where(MessageRow.updated_at < cutoff))
            await feedback_events.prune(s, cutoff)
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # -- reads ----------------------------------------------------------------------

    async def history(self, address: str) -> list[LogLine]:
        """Every message row and feedback event for an address, newest first."""
        addr = normalize(address)
        async with self.db.session() as s:
            msgs = await s.scalars(select(MessageRow).where(MessageRow.recipient == addr))
            evts = await s.scalars(select(FeedbackEvent).where(FeedbackEvent.recipient == addr))
            listed = await s.get(Suppression, addr)
            lines = [LogLine(listed.created_at, "suppression", listed.reason, "", "",
                             f"since {listed.source}: {listed.detail}".rstrip(": "))
                     ] if listed is not None else []
            lines += [
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
