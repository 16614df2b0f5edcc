"""The message log's writes: what each delivery outcome leaves in the messages table,
written one at a time and batched by the writer task (same rows either way), and how
few statements a batch costs. Real database (SQLite, or PostgreSQL on the CI pass)."""

from __future__ import annotations

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select

from relay.spool.record import Envelope, Record
from relay.store.db import Database, MessageRow
from relay.store.messages import MessageLog, Write, message_id_header
from tests.conftest import database_for

RCPTS = ("A@example.net", "b@example.net", "c@example.net", "d@example.net")


def record(qid: str, attempts: int = 0) -> Record:
    return Record(id=qid, envelope=Envelope("s@example.com", RCPTS, 0.0), size=1,
                  attempts=attempts)


#: (kind, queue id, record attempts, recipients, ses message id, error): the outcomes of
#: two messages, one whose queued rows exist (Q1) and one whose do not (Q2)
OUTCOMES = [
    ("deferred", "Q1", 1, ["A@example.net", "b@example.net"], "", "451 try later"),
    ("throttled", "Q1", 1, ["a@example.net"], "", "TooManyRequestsException"),
    ("held", "Q2", 0, ["a@example.net"], "", "MailFromDomainNotVerifiedException"),
    ("sent", "Q1", 1, ["a@example.net", "A@Example.net"], "M1", ""),
    ("suppressed", "Q2", 0, ["b@example.net"], "", ""),
    ("rejected", "Q1", 1, ["b@example.net"], "", "MessageRejected: no"),
    ("sent", "Q2", 0, ["c@example.net"], "M2", ""),
    ("deferred", "Q2", 3, ["d@example.net"], "", "InternalFailure"),
    ("failed", "Q1", 1, ["c@example.net"], "", "expired: no attempt succeeded"),
    ("expired", "Q1", 1, ["d@example.net"], "", "expired"),
]

#: (queue id, recipient) -> (status, ses MessageId, attempts, last error, sent_at set)
EXPECTED = {
    ("Q1", "a@example.net"): ("sent", "M1", 2, "", True),
    ("Q1", "b@example.net"): ("failed", "", 2, "MessageRejected: no", False),
    ("Q1", "c@example.net"): ("failed", "", 0, "expired: no attempt succeeded", False),
    ("Q1", "d@example.net"): ("failed", "", 0, "expired", False),
    ("Q2", "a@example.net"): ("queued", "", 0, "MailFromDomainNotVerifiedException", False),
    ("Q2", "b@example.net"): ("suppressed", "", 0, "", False),
    ("Q2", "c@example.net"): ("sent", "M2", 1, "", True),
    ("Q2", "d@example.net"): ("deferred", "", 1, "InternalFailure", False),
}


async def queued_rows(db: Database, qid: str) -> None:
    from relay.store.messages import upsert_queued

    async with db.engine.begin() as conn:
        await conn.execute(upsert_queued(conn.dialect.name), [
            {"queue_id": qid, "recipient": r.lower(), "message_id_header": "<m@x>",
             "status": "queued", "attempts": 0, "created_at": 1.0, "updated_at": 1.0}
            for r in RCPTS])


def writes_to_messages(db: Database) -> list[tuple[str, int]]:
    """The writes to `messages` from now on: (statement, rows) per execute."""
    statements: list[tuple[str, int]] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if "messages" in statement and not statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement.split("(")[0].strip(),
                               len(parameters) if executemany else 1))

    sa_event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    if db.thread_engine is not None:  # SQLite: the message log writes in its thread
        sa_event.listen(db.thread_engine.engine, "before_cursor_execute", before)
    return statements


def queued_row(qid: str, header: str) -> dict[str, object]:
    n = qid[1:]
    return {"queue_id": qid, "recipient": f"r{n}@example.net", "message_id_header": header,
            "status": "queued", "attempts": 0, "created_at": 1.0, "updated_at": 1.0}


async def table(db: Database) -> dict[tuple[str, str], tuple[str, str, int, str, bool]]:
    async with db.session() as s:
        rows = await s.scalars(select(MessageRow))
        return {(r.queue_id, r.recipient): (r.status, r.ses_message_id, r.attempts, r.last_error,
                                           r.sent_at is not None) for r in rows}


@pytest.mark.parametrize("batched", [False, True])
async def test_each_outcome_leaves_the_rows_it_always_left(tmp_path, batched):
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        await queued_rows(db, "Q1")
        log = MessageLog(db)
        if batched:
            await log.start()
        for kind, qid, attempts, rcpts, ses_id, error in OUTCOMES:
            await log.outcome(kind, record(qid, attempts), rcpts, ses_message_id=ses_id,
                              error=error)
        await log.stop()
        assert await table(db) == EXPECTED
    finally:
        await db.close()


def test_message_id_header_variants():
    head = b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nMessage-ID: <no>\r\n"
    assert message_id_header(head) == "<a@b>"


def parser_message_id(data: bytes) -> str:
    """What the email package reads (the definition message_id_header must keep)."""
    from email.parser import BytesHeaderParser

    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 2]
    return str(BytesHeaderParser().parsebytes(head).get("Message-ID", "")).strip()[:998]


LINES = [
    b"Subject: x\r\n", b"Message-ID: <a@b.example>\r\n", b"message-id:<low@b>\r\n",
    b"MESSAGE-ID:   <spaced@b>   \r\n", b"Message-ID:\r\n <folded@b>\r\n",
    b"Message-ID: <fold\r\n\ted@b>\r\n", b"Message-ID : <space-before-colon@b>\r\n",
    b"From sender@example.com Mon Nov 23 00:00:00 2026\r\n", b"X-Bare: cr\rMessage-ID: <cr@b>\r\n",
    b"X-Utf8: \xc3\xa9t\xc3\xa9\r\n", b"Message-ID: <\xc3\xa9@b>\r\n", b": empty name\r\n",
    b"Received: from x\r\n\tby y; Mon, 23 Nov 2026\r\n", b"not a header line\r\n",
    b"Message-ID: <lf@b>\n", b"\r\n", b"Message-ID: <" + b"x" * 1200 + b">\r\n",
]


def test_message_id_header_reads_what_the_email_parser_reads():
    cases = [a + b + c + b"\r\nbody\r\nMessage-ID: <in-body@b>\r\n"
             for a in LINES for b in LINES for c in LINES]
    cases += [b"".join(LINES), b"Message-ID: <no-body@b>", b""]
    wrong = [c for c in cases if message_id_header(c) != parser_message_id(c)]
    assert not wrong, wrong[:5]


def test_a_plain_header_block_is_read_without_the_email_parser():
    from relay.store.messages import _plain_message_id

    head = (b"Received: from client (localhost [127.0.0.1])\r\n\tby relay (relay) with ESMTP;\r\n"
            b"\tMon, 23 Nov 2026 00:00:00 +0000\r\nFrom: a@example.com\r\n"
            b"Message-ID: <m1@bench.example>\r\nSubject: s\r\n\r\n")
    assert _plain_message_id(head) == "<m1@bench.example>"
    assert _plain_message_id(b"Message-ID:\r\n <folded@b>\r\n\r\n") is None


@pytest.mark.parametrize("in_turn", [False, True])
async def test_a_batch_of_writes_costs_one_statement_per_run(tmp_path, in_turn):
    # in turn: a busy relay queues and sends messages in turn, and the batch's queued rows
    # still go as one statement
    db = await Database.open(database_for(tmp_path), tmp_path)
    statements = writes_to_messages(db)
    order = ([("queued", n) for n in range(10)] + [("sent", n) for n in range(20)])
    if in_turn:
        order = [w for n in range(10) for w in (("queued", n), ("sent", n))] + order[20:]
    try:
        log = MessageLog(db)
        await log.start()
        for kind, n in order:
            if kind == "queued":
                await log._submit(Write(("queued",), [queued_row(f"Q{n}", "<m@x>")]))
            else:
                await log.outcome("sent", record(f"Q{n}"), [f"r{n}@example.net"],
                                  ses_message_id=f"M{n}")
        await log.stop()
        assert statements == [("INSERT INTO messages", 10), ("INSERT INTO messages", 20)]
        rows = await table(db)
        assert len(rows) == 20
        assert all(rows[f"Q{n}", f"r{n}@example.net"] == ("sent", f"M{n}", 1, "", True)
                   for n in range(20))
        async with db.session() as s:
            headers = {r.queue_id: r.message_id_header for r in await s.scalars(
                select(MessageRow))}
        assert headers == {f"Q{n}": "<m@x>" if n < 10 else "" for n in range(20)}
    finally:
        await db.close()
