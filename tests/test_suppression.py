"""The suppression list and message log: operator CLI, RCPT-time rejection, normalization,
retention, and the core's import boundary (the guard's arithmetic:
tests/unit/test_reputation.py)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import event as sa_event

from relay.spool.record import Envelope, Record
from relay.store.db import Database
from relay.store.messages import MessageLog, message_id_header
from relay.store.suppression import SuppressionList, normalize, parse_csv
from tests.conftest import PG_SERVER, database_for, relay_sections, wait_for, write_config
from tests.feedback_helpers import cli, send, statuses, suppressed


def with_database(path):
    """The config at path, with the database `relay serve` would have created."""
    from relay import config as config_mod

    cfg = config_mod.load(path)

    async def create() -> None:
        await (await Database.open(cfg.database.url, cfg.spool.dir)).close()

    asyncio.run(create())
    return path


@pytest.fixture
def config(tmp_path):
    return with_database(write_config(tmp_path / "relay.toml", relay_sections(tmp_path, "sandbox")))


@pytest.mark.parametrize("raw,norm", [
    ("User@Example.COM", "user@example.com"),
    (" <a@b.example> ", "a@b.example"),
    ("x@bücher.example", "x@xn--bcher-kva.example"),
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_cli_add_list_remove_import_export(config, tmp_path):
    assert "added" in cli(config, "suppression", "add", "Jane@Example.com").stdout
    assert "already" in cli(config, "suppression", "add", "jane@example.com").stdout
    rows = suppressed(config)
    assert list(rows) == ["jane@example.com"] and rows["jane@example.com"]["reason"] == "manual"
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("address,reason,detail\nbob@example.org,complaint,from the old relay\n"
                        "carol@example.org,,\n")
    imported = cli(config, "suppression", "import", str(csv_file)).stdout
    assert "imported 2 addresses (2 new)" in imported
    assert suppressed(config)["bob@example.org"]["reason"] == "complaint"
    exported = cli(config, "suppression", "export").stdout
    assert exported.splitlines()[0].startswith("address,reason")
    assert len(exported.splitlines()) == 4
    cli(config, "suppression", "remove", "BOB@example.org")
    assert set(suppressed(config)) == {"jane@example.com", "carol@example.org"}
    text = cli(config, "suppression", "list").stdout
    assert "carol@example.org\tmanual\timport" in text


def test_cli_errors_name_what_is_wrong(config, tmp_path):
    bad = cli(config, "suppression", "add", "not-an-address", check=False)
    assert bad.returncode == 1 and "not an email address" in bad.stderr
    missing = cli(config, "suppression", "remove", "nobody@example.org", check=False)
    assert missing.returncode == 1 and "not on the suppression list" in missing.stderr
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("address,reason\nok@example.org,manual\nbroken,manual\n")
    out = cli(config, "suppression", "import", str(csv_file), check=False)
    assert out.returncode == 1 and "line 3" in out.stderr
    assert suppressed(config) == {}  # nothing half-imported
    quoted = tmp_path / "quoted.csv"  # an unterminated quote past the 128 KB field limit
    quoted.write_text('address\nok@example.org\n"bad@example.org\n' + "x" * 140_000)
    out = cli(config, "suppression", "import", str(quoted), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"relay: {quoted}: line 3: cannot read the CSV: field "
                                  "larger than field limit (131072) (an unterminated quote?)")
    long_source = tmp_path / "source.csv"  # the column holds 32: refused, not cut
    long_source.write_text("address,source\nok@example.org," + "s" * 33 + "\n")
    out = cli(config, "suppression", "import", str(long_source), check=False)
    assert out.returncode == 1 and "line 2: source" in out.stderr
    assert "longer than 32 characters" in out.stderr
    assert suppressed(config) == {}
    wrong = cli(config, "suppression", "add", "a@example.org", "--reason", "nope", check=False)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
    nothing = cli(config, "log", "nobody@example.org", check=False)
    assert nothing.returncode == 1 and "nothing logged" in nothing.stderr


def test_parse_csv_bare_addresses():
    assert [r["address"] for r in parse_csv("a@example.org\nb@example.org\n\n")] == [
        "a@example.org", "b@example.org"]


def test_reject_suppressed_at_rcpt(start_relay, sandbox):
    relay = start_relay(sandbox.url, smtp={"reject_suppressed": True})
    cli(relay, "suppression", "add", "gone@example.net")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("app@example.com")
        code, msg = s.rcpt("Gone@Example.net")
        assert (code, msg[:5]) == (550, b"5.1.1")
        assert s.rcpt("here@example.net")[0] == 250


def test_delivery_time_suppression_without_rcpt_check(start_relay, sandbox):
    relay = start_relay(sandbox.url, delivery={"max_rate": 1000})
    cli(relay, "suppression", "add", "gone@example.net")
    qid = send(relay.smtp_port, ["gone@example.net", "here@example.net"])
    sent = wait_for(lambda: relay.find("sent", queue_id=qid), 20)
    calls = sandbox.state.accepted()
    assert [c.recipients for c in calls] == [["here@example.net"]]
    assert sent["ses_message_id"] == calls[0].message_id
    assert statuses(relay, "gone@example.net")[qid] == "suppressed"
    assert statuses(relay, "here@example.net")[qid] == "sent"


async def test_log_rows_and_retention(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        log = MessageLog(db)
        rec = Record(id="Q1", envelope=Envelope("s@example.com", ("A@example.net",), 0.0), size=1)
        await log.outcome("deferred", rec, ["A@example.net"], error="451 try later")
        await log.outcome("sent", rec, ["A@example.net"], ses_message_id="M1")
        rows = await log.rows("a@example.net")
        assert [(r.status, r.ses_message_id, r.last_error) for r in rows] == [("sent", "M1", "")]
        assert await log.prune(3600, now=time.time()) == 0
        assert await log.prune(3600, now=time.time() + 7200) == 1
        assert await log.rows("a@example.net") == []
    finally:
        await db.close()


def count_suppression_selects(db: Database) -> list[list[str]]:
    """The address lists of every delivery-time check (SELECT ... FROM suppressions WHERE
    address IN (...)) as the database received them through the async engine.

    The checks are sent down the engine's path (PostgreSQL's, and SQLite's when the
    database is busy) by leaving the loop reader out."""
    db.loop_reader = None
    seen: list[list[str]] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if "FROM suppressions" in statement and ".address IN (" in statement:
            flat = parameters.values() if isinstance(parameters, dict) else parameters
            seen.append(sorted(str(p) for p in flat))

    sa_event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    return seen


async def test_concurrent_delivery_checks_share_one_select(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        sl = SuppressionList(db)
        await sl.add("Gone@Example.net", reason="bounce")
        await sl.add("angry@example.org", reason="complaint")
        selects = count_suppression_selects(db)
        asks = [[f"ok{i}@example.net", "GONE@example.net"] if i % 3 == 0 else [f"ok{i}@example.net"]
                for i in range(20)] + [["Angry@Example.org", "x@example.org"]]
        answers = await asyncio.gather(*(sl.suppressed(a) for a in asks))
        assert answers == [{"GONE@example.net"} if i % 3 == 0 else set() for i in range(20)] \
            + [{"Angry@Example.org"}]
        assert len(selects) == 1  # 21 calls in one loop iteration, one query
        assert len(selects[0]) == 23  # every distinct normalized address, once
        # one at a time, each call has its own query
        assert await sl.suppressed(["gone@example.net"]) == {"gone@example.net"}
        assert await sl.is_suppressed("nobody@example.net") is False
        assert len(selects) == 3
    finally:
        await db.close()


async def test_a_suppression_committed_while_a_check_is_in_flight_stops_the_next_check(tmp_path):
    """Invariant 5: a caller never gets the answer of a query that began before its call."""
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        sl = SuppressionList(db)
        selects = count_suppression_selects(db)
        later: list[asyncio.Task[set[str]]] = []

        async def suppress_then_check() -> set[str]:
            await sl.add("late@example.net", reason="complaint")
            return await sl.suppressed(["late@example.net", "fine@example.net"])

        def during_first_select(conn, cursor, statement, parameters, context, executemany):
            if "FROM suppressions" in statement and not later:
                later.append(asyncio.get_running_loop().create_task(suppress_then_check()))

        sa_event.listen(db.engine.sync_engine, "before_cursor_execute", during_first_select)
        first = await sl.suppressed(["late@example.net"])
        assert await later[0] == {"late@example.net"}
        # the first check's query may or may not have seen the row (it raced the commit);
        # the later one must, so it had a query of its own
        assert first in (set(), {"late@example.net"})
        assert len([s for s in selects if "fine@example.net" in s]) == 1
        assert len(selects) == 2
    finally:
        await db.close()


async def test_a_failed_check_fails_every_caller_and_the_next_check_works(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        db.loop_reader = None  # the async engine's path
        sl = SuppressionList(db)
        await sl.add("gone@example.net", reason="bounce")
        fail = [True]

        def broken_once(conn, cursor, statement, parameters, context, executemany):
            if "FROM suppressions" in statement and fail:
                fail.clear()
                raise RuntimeError("database went away")

        sa_event.listen(db.engine.sync_engine, "before_cursor_execute", broken_once)
        answers = await asyncio.gather(sl.suppressed(["a@example.net"]),
                                       sl.suppressed(["gone@example.net"]),
                                       return_exceptions=True)
        assert [type(a) for a in answers] == [RuntimeError, RuntimeError]
        assert await sl.suppressed(["gone@example.net"]) == {"gone@example.net"}
    finally:
        await db.close()



def engine_selects_of_suppressions(db: Database) -> list[str]:
    """Every SELECT of the suppressions table that went through the async engine."""
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if "FROM suppressions" in statement:
            seen.append(statement)

    sa_event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    return seen


@pytest.mark.skipif(bool(PG_SERVER), reason="the loop reader is SQLite's")
async def test_on_sqlite_each_check_is_read_on_the_loop_and_sees_every_commit_before_it(tmp_path):
    """Invariant 5 on the loop reader: no read keeps a snapshot past its check, nothing
    is cached; another connection's commit (the CLI, the feedback applier) counts at once."""
    db = await Database.open("", tmp_path)
    other = await Database.open("", tmp_path)
    try:
        sl, writer = SuppressionList(db), SuppressionList(other)
        via_engine = engine_selects_of_suppressions(db)
        assert await sl.suppressed(["Late@Example.net", "x@example.net"]) == set()
        await writer.add("late@example.net", reason="complaint")
        assert await sl.suppressed(["Late@Example.net", "x@example.net"]) == {"Late@Example.net"}
        await writer.remove("late@example.net")
        assert await sl.suppressed(["Late@Example.net"]) == set()
        await writer.add("late@example.net", reason="bounce")
        assert await sl.is_suppressed("late@example.net")
        many = [f"r{i}@example.net" for i in range(40)]  # more than one statement's worth
        await writer.add("r33@example.net", reason="bounce")
        await writer.add("r2@example.net", reason="bounce")
        assert await sl.suppressed(many) == {"r2@example.net", "r33@example.net"}
        assert db.loop_reader is not None and db.loop_reader.fallbacks == 0
        assert via_engine == []
    finally:
        await other.close()
        await db.close()


@pytest.mark.skipif(bool(PG_SERVER), reason="SQLite's file locks")
async def test_a_locked_database_sends_the_check_to_the_engine_which_waits_for_the_lock(tmp_path):
    """The loop never waits for a lock: busy, the check goes to the engine's thread, which
    waits (database.lock_timeout) and answers exactly; the loop keeps running meanwhile."""
    db = await Database.open("", tmp_path)
    try:
        sl = SuppressionList(db)
        reader = db.loop_reader
        assert reader is not None
        assert await sl.suppressed(["held@example.net"]) == set()
        reader.close()  # every connection closed, so another can lock the file alone
        await db.engine.dispose()
        holder = sqlite3.connect(tmp_path / "relay.db", isolation_level=None, timeout=0)
        try:
            holder.execute("PRAGMA locking_mode=EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            holder.execute("INSERT INTO suppressions (address, reason, source, detail, "
                           "created_at, updated_at) VALUES "
                           "('held@example.net', 'complaint', 'test', '', 0, 0)")
            holder.execute("COMMIT")  # committed; the file stays locked while it is open
            check = asyncio.create_task(sl.suppressed(["held@example.net", "ok@example.net"]))
            for _ in range(3000):
                if reader.fallbacks:
                    break
                await asyncio.sleep(0.01)
            assert reader.fallbacks == 1
            for _ in range(50):
                await asyncio.sleep(0)
            assert not check.done()  # the engine waits for the lock
        finally:
            holder.close()
        assert await check == {"held@example.net"}
        assert await sl.suppressed(["held@example.net"]) == {"held@example.net"}
        assert reader.fallbacks == 1  # no lock any more: read on the loop again
    finally:
        await db.close()


def test_the_loop_reader_steps_aside_when_it_cannot_read_on_its_own(tmp_path):
    """A file it cannot open, or a call from another thread: None (the async engine's
    path), never an empty answer."""
    from relay.store.loop_read import LoopReader

    missing = LoopReader(tmp_path / "missing.db")
    assert missing.suppressed(["a@example.net"]) is None and missing.broken
    made = sqlite3.connect(tmp_path / "relay.db")
    made.executescript("CREATE TABLE suppressions (address TEXT PRIMARY KEY);"
                       "INSERT INTO suppressions VALUES ('a@example.net');")
    made.close()
    reader = LoopReader(tmp_path / "relay.db")
    try:
        assert reader.suppressed(["a@example.net", "b@example.net"]) == {"a@example.net"}
        elsewhere: list[object] = []
        thread = threading.Thread(target=lambda: elsewhere.append(
            reader.suppressed(["a@example.net"])))
        thread.start()
        thread.join(30)
        assert elsewhere == [None]
    finally:
        reader.close()

def test_message_id_header():
    head = b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nMessage-ID: <no>\r\n"
    assert message_id_header(head) == "<a@b>"


def test_feedback_modules_import_no_transport():
    code = (
        "import sys, relay.store.suppression, relay.store.messages, relay.store.db,"
        " relay.feedback.parse, relay.feedback.decisions, relay.feedback.applier,"
        " relay.feedback.guard;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('aiosmtpd', 'aioboto3', 'aiobotocore', 'botocore', 'aiohttp')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_suppression_sync_imports_the_account_list_page_by_page(tmp_path, sandbox):
    sandbox.state.account_suppressed.update(
        {f"old{n}@example.org": ("COMPLAINT" if n % 2 else "BOUNCE") for n in range(2500)})
    config = with_database(write_config(tmp_path / "sync.toml",
                                        relay_sections(tmp_path, sandbox.url)))
    out = cli(config, "suppression", "sync").stdout
    assert "2500 addresses (2500 new)" in out
    rows = suppressed(config)
    assert len(rows) == 2500
    assert rows["old1@example.org"]["reason"] == "complaint"
    assert rows["old2@example.org"]["reason"] == "bounce"
    assert rows["old2@example.org"]["source"] == "ses-account"
    assert "2500 addresses (0 new)" in cli(config, "suppression", "sync").stdout


async def test_transient_bounces_count_to_the_limit_and_a_delivery_starts_over(tmp_path):
    from relay.feedback.applier import FeedbackApplier
    from relay.feedback.parse import parse
    from tests.feedback_helpers import notification, snapshot

    def soft(n: int, recipients: list[str]) -> str:
        return json.dumps(notification("synthetic-ses-notification-bounce-transient.json",
                                       message_id=f"M{n}", destination=recipients,
                                       recipients=recipients))

    def delivered(n: int, recipient: str) -> str:
        return json.dumps(notification("ses-notification-delivery.json", message_id=f"D{n}",
                                       destination=[recipient]))

    async def state() -> tuple[dict[str, int], dict[str, str]]:
        rows = await snapshot(tmp_path, ("bounce_counts", "suppressions"))
        return ({r[0]: r[1] for r in rows["bounce_counts"]},
                {r[0]: r[1] for r in rows["suppressions"]})

    db = await Database.open(database_for(tmp_path), tmp_path)
    applier = FeedbackApplier(db, soft_bounce_limit=3)
    try:
        for n in (0, 1):
            assert (await applier.apply(parse(soft(n, ["a@x.example"])))).suppressed == []
        assert await state() == ({"a@x.example": 2}, {})
        await applier.apply(parse(delivered(1, "a@x.example")))
        assert await state() == ({}, {})
        for n in (2, 3):
            await applier.apply(parse(soft(n, ["a@x.example", "b@x.example"])))
        assert await state() == ({"a@x.example": 2, "b@x.example": 2}, {})
        third = await applier.apply(parse(soft(4, ["A@X.example"])))
        assert third.suppressed == ["a@x.example"]
        assert await state() == ({"a@x.example": 3, "b@x.example": 2},
                                 {"a@x.example": "soft-bounce limit"})
    finally:
        await db.close()


async def test_feedback_before_the_sent_row_still_marks_it(tmp_path):
    from relay.feedback.applier import FeedbackApplier
    from relay.feedback.parse import parse
    from tests.feedback_helpers import notification

    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        doc = notification("ses-notification-bounce-permanent-no-dsn.json", message_id="M9",
                           destination=["a@example.net", "b@example.net"],
                           recipients=["a@example.net"])
        await FeedbackApplier(db).apply(parse(json.dumps(doc)))
        rec = Record(id="Q9", envelope=Envelope("s@example.com", ("a@example.net", "b@example.net"),
                                                0.0), size=1)
        await MessageLog(db).outcome("sent", rec, ["a@example.net", "b@example.net"],
                                     ses_message_id="M9")
        log = MessageLog(db)
        assert [r.status for r in await log.rows("a@example.net")] == ["bounced"]
        assert [r.status for r in await log.rows("b@example.net")] == ["sent"]
    finally:
        await db.close()


@pytest.mark.parametrize("env,key", [
    ({"RELAY_FEEDBACK__TOPIC_ARNS": "arn:aws:s3:::bucket"}, "feedback.topic_arns"),
    ({"RELAY_FEEDBACK__SNS_ENDPOINT": "true"}, "feedback.topic_arns"),
    ({"RELAY_FEEDBACK__MAX_BOUNCE_RATE": "2"}, "feedback.max_bounce_rate"),
    ({"RELAY_FEEDBACK__WAIT_TIME": "30s"}, "feedback.wait_time"),
    ({"RELAY_FEEDBACK__MAX_MESSAGES": "11"}, "feedback.max_messages"),
    ({"RELAY_FEEDBACK__SOFT_BOUNCE_LIMIT": "0"}, "feedback.soft_bounce_limit"),
    ({"RELAY_FEEDBACK__SQS_ENDPOINT_URL": "localhost:4566"}, "feedback.sqs_endpoint_url"),
    ({"RELAY_DATABASE__URL": "mysql://db/relay"}, "database.url"),
    ({"RELAY_SMTP__REJECT_SUPPRESSED": "maybe"}, "smtp.reject_suppressed"),
])
def test_bad_feedback_config_names_the_key(env, key):
    from relay import config as config_mod
    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env=env)
    assert key in str(err.value)


def test_operator_commands_at_once_on_one_database(config):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: cli(config, "suppression", "add", f"u{n}@example.org",
                                              check=False), range(4)))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    assert len(suppressed(config)) == 4
