"""The SQS ingester against moto's SQS: idempotent, deletes only after commit, leaves
garbage for the redrive policy; and the parser on every documented sample."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from relay.feedback.applier import FeedbackApplier
from relay.feedback.parse import Unparseable, events, parse
from relay.feedback.sns import Verifier
from relay.feedback.sqs import SqsIngester
from relay.store.db import Database
from tests.conftest import database_for
from tests.feedback_helpers import (
    CERT_URL,
    FIXTURES,
    TOPIC,
    fixture,
    notification,
    pki,
    signed_envelope,
    snapshot,
)


@pytest.fixture
def queue(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=moto_server)
    url = sqs.create_queue(QueueName=f"fb-{uuid.uuid4().hex[:8]}",
                           Attributes={"VisibilityTimeout": "0"})["QueueUrl"]
    return sqs, url


def in_queue(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return (int(attrs["ApproximateNumberOfMessages"])
            + int(attrs["ApproximateNumberOfMessagesNotVisible"]))


def envelope(doc: dict) -> str:
    return signed_envelope(doc)


async def fetch(url: str) -> bytes:
    assert url == CERT_URL, "only the allow-listed URL may ever be fetched"
    return pki()[1]


async def ingester(tmp_path: Path, moto_server: str, url: str, **kw) -> tuple[SqsIngester,
                                                                              Database]:
    db = await Database.open(database_for(tmp_path), tmp_path)
    return SqsIngester(applier=FeedbackApplier(db), queue_url=url, region="us-east-1",
                       verifier=Verifier(topic_arns=[TOPIC], fetch=fetch),
                       endpoint_url=moto_server, wait_time=0, **kw), db


async def test_same_sqs_message_twice_changes_nothing_the_second_time(tmp_path, moto_server, queue):
    sqs, url = queue
    body = envelope(notification("ses-notification-bounce-permanent-with-dsn.json",
                                 message_id="0100-abc", destination=["a@example.net"]))
    sqs.send_message(QueueUrl=url, MessageBody=body)
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        async with ing.client() as client:
            assert await ing.poll_once(client) == 1
            first = await snapshot(tmp_path)
            assert [r[0] for r in first["suppressions"]] == ["a@example.net"]
            assert in_queue(sqs, url) == 0
            # SQS delivers at least once: the same body again
            sqs.send_message(QueueUrl=url, MessageBody=body)
            assert await ing.poll_once(client) == 1
    finally:
        await db.close()
    assert await snapshot(tmp_path) == first
    assert ing.counts["applied"] == 1 and ing.counts["duplicate"] == 1
    assert in_queue(sqs, url) == 0


async def test_garbage_is_counted_and_not_deleted(tmp_path, moto_server, queue):
    sqs, url = queue
    for body in ("not json at all", json.dumps({"notificationType": "Mystery", "mail": {}}),
                 json.dumps({"Type": "Notification", "TopicArn": "t", "Message": "{oops"})):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        async with ing.client() as client:
            deleted = 0
            for _ in range(3):
                deleted += await ing.poll_once(client)
    finally:
        await db.close()
    assert deleted == 0
    assert ing.counts["unparseable"] >= 3
    assert in_queue(sqs, url) == 3
    assert (await snapshot(tmp_path))["feedback_events"] == []


async def test_raw_delivery_body_is_applied_only_when_configured(tmp_path, moto_server, queue):
    sqs, url = queue
    doc = notification("ses-event-complaint.json", message_id="0100-raw",
                       destination=["c@example.net"])
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(doc))
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        async with ing.client() as client:
            assert await ing.poll_once(client) == 0  # refused, left for the redrive policy
        assert ing.counts["rejected"] == 1 and in_queue(sqs, url) == 1
        assert (await snapshot(tmp_path))["suppressions"] == []
        ing = SqsIngester(applier=ing.applier, verifier=ing.verifier, queue_url=url,
                          region="us-east-1", endpoint_url=moto_server, wait_time=0,
                          raw_delivery=True)
        async with ing.client() as client:
            assert await ing.poll_once(client) == 1
    finally:
        await db.close()
    rows = (await snapshot(tmp_path))["suppressions"]
    assert [(r[0], r[1]) for r in rows] == [("c@example.net", "complaint")]


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*ses-*.json")))
def test_every_documented_sample_parses(name):
    doc = fixture(name)
    note = parse(json.dumps(doc))
    assert note.kind == (doc.get("notificationType") or doc.get("eventType"))
    assert note.ses_message_id == doc["mail"]["messageId"]
    wrapped = parse(envelope(doc))
    assert wrapped.kind == note.kind and wrapped.ses_message_id == note.ses_message_id


@pytest.mark.parametrize("body", ["", "[]", '{"Type": "SubscriptionConfirmation", "TopicArn": "t"}',
                                  '{"notificationType": "Bounce"}',
                                  '{"eventType": "Bounce", "mail": {"messageId": ""}}'])
def test_unparseable_bodies(body):
    with pytest.raises(Unparseable):
        parse(body)


async def test_event_kinds_update_the_log(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    applier = FeedbackApplier(db)
    try:
        from relay.spool.record import Envelope, Record
        from relay.store.messages import MessageLog

        record = Record(id="Q1", envelope=Envelope("s@example.com", ("r@example.net",), 0.0),
                        size=1)
        await MessageLog(db).outcome("sent", record, ["r@example.net"], ses_message_id="M1")
        results = {}
        for name in ("ses-event-send.json", "ses-event-deliverydelay.json",
                     "ses-event-reject.json"):
            doc = fixture(name)
            doc["mail"]["messageId"], doc["mail"]["destination"] = "M1", ["r@example.net"]
            if "deliveryDelay" in doc:
                doc["deliveryDelay"]["delayedRecipients"][0]["emailAddress"] = "r@example.net"
            results[name] = (await applier.apply(parse(json.dumps(doc)))).outcome
            rows = await MessageLog(db).rows("r@example.net")
            results[name + ":status"] = rows[0].status
    finally:
        await db.close()
    assert results["ses-event-send.json"] == "applied"
    assert results["ses-event-send.json:status"] == "sent"
    assert results["ses-event-deliverydelay.json:status"] == "sent"
    assert results["ses-event-reject.json:status"] == "failed"


@pytest.mark.parametrize("url,region", [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012/ses-feedback", "eu-west-1"),
    ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", "cn-north-1"),
    ("http://127.0.0.1:4566/000000000000/q", "us-east-1"),
])
def test_queue_region(url, region):
    from relay.feedback.sqs import queue_region

    assert queue_region(url, "us-east-1") == region


async def test_malformed_but_parseable_notification_is_unparseable(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        doc = fixture("ses-notification-bounce-permanent-no-dsn.json")
        doc["bounce"] = ["not", "an", "object"]
        with pytest.raises(Unparseable):
            await FeedbackApplier(db).apply(parse(json.dumps(doc)))
    finally:
        await db.close()


async def test_migrations_match_the_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from relay.store.db import Base

    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    finally:
        await db.close()
    assert diff == []


async def poll_until(ing: SqsIngester, done: Callable[[int], bool], polls: int = 10) -> int:
    """poll_once until done(messages deleted so far), at most `polls` times; the deleted."""
    deleted = 0
    async with ing.client() as client:
        for _ in range(polls):
            deleted += await ing.poll_once(client)
            if done(deleted):
                break
    return deleted


def bounce(address: str, message_id: str = "0100-b") -> dict:
    return notification("ses-notification-bounce-permanent-with-dsn.json",
                        message_id=message_id, destination=[address])


async def test_a_batch_applies_once_what_it_holds_twice_and_what_came_before(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    applier = FeedbackApplier(db)
    first, second = bounce("a@example.net"), bounce("b@example.net")
    delivery = notification("ses-notification-delivery.json", message_id="0100-d",
                            destination=["c@example.net"])
    try:
        notes = [parse(envelope(d)) for d in (first, delivery, first, second)]
        batch = await applier.apply_batch([(n, events(n)) for n in notes])
        assert batch.outcomes == ["applied", "applied", "duplicate", "applied"]
        assert sorted(batch.suppressed) == ["a@example.net", "b@example.net"]
        assert batch.kinds == {"bounce": 2, "delivery": 1}
        after_first = await snapshot(tmp_path)
        # the next batch: the same bounce again (another SNS envelope) and a new one
        third = bounce("d@example.net")
        notes = [parse(envelope(d)) for d in (second, third)]
        batch = await applier.apply_batch([(n, events(n)) for n in notes])
        assert batch.outcomes == ["duplicate", "applied"]
        assert [e.recipient for e in batch.events] == ["d@example.net"]
    finally:
        await db.close()
    rows = await snapshot(tmp_path)
    assert len(rows["feedback_events"]) == len(after_first["feedback_events"]) + 1 == 4
    assert [r[0] for r in rows["suppressions"]] == ["a@example.net", "b@example.net",
                                                    "d@example.net"]


async def test_one_bounce_counts_once_in_both_formats_wrapped_raw_or_re_encoded(tmp_path):
    db = await Database.open(database_for(tmp_path), tmp_path)
    applier = FeedbackApplier(db)
    doc = notification("ses-event-bounce.json", message_id="0100-f",
                       destination=["e@example.net"])
    as_notification = {("notificationType" if k == "eventType" else k): v
                       for k, v in doc.items()}
    bodies = [json.dumps(doc), envelope(doc), envelope(as_notification),
              json.dumps(as_notification, indent=3, sort_keys=True)]
    try:
        outcomes = [(await applier.apply(parse(b))).outcome for b in bodies]
    finally:
        await db.close()
    assert outcomes == ["applied", "duplicate", "duplicate", "duplicate"]
    rows = await snapshot(tmp_path)
    assert [(r[2], r[3]) for r in rows["feedback_events"]] == [("e@example.net", "bounce")]


async def test_one_bad_message_does_not_hold_up_the_good_ones(tmp_path, moto_server, queue):
    sqs, url = queue
    sqs.send_message(QueueUrl=url, MessageBody=envelope(bounce("f@example.net")))
    sqs.send_message(QueueUrl=url, MessageBody='{"Type": "Notification", "Message": "{oops"}')
    sqs.send_message(QueueUrl=url, MessageBody=envelope(bounce("g@example.net")))
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        deleted = await poll_until(ing, lambda n: n == 2 and ing.counts["unparseable"] > 0)
    finally:
        await db.close()
    assert deleted == 2 and ing.counts["applied"] == 2
    assert in_queue(sqs, url) == 1  # the bad one, for the redrive policy
    rows = await snapshot(tmp_path)
    assert [r[0] for r in rows["suppressions"]] == ["f@example.net", "g@example.net"]
    assert ing.stats()["feedback_lag_p99"] >= 0 and len(ing.lags) == 2


async def test_nothing_is_deleted_until_the_batch_is_committed(tmp_path, moto_server, queue):
    """The database refuses the write (another writer holds SQLite's lock): the batch
    stays in SQS; once the database takes writes again it is applied and deleted."""
    import sqlite3

    sqs, url = queue
    for addr in ("h@example.net", "i@example.net"):
        sqs.send_message(QueueUrl=url, MessageBody=envelope(bounce(addr)))
    path = tmp_path / "locked.db"
    db = await Database.open(f"sqlite:///{path}", tmp_path, lock_timeout=0.2)
    ing = SqsIngester(applier=FeedbackApplier(db), queue_url=url, region="us-east-1",
                      verifier=Verifier(topic_arns=[TOPIC], fetch=fetch),
                      endpoint_url=moto_server, wait_time=0, max_messages=10)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Exception, match="locked"):
            await poll_until(ing, lambda n: False)  # until a receive returns something
        assert in_queue(sqs, url) == 2
        holder.execute("ROLLBACK")
        assert await poll_until(ing, lambda n: n == 2) == 2
        assert in_queue(sqs, url) == 0
        async with db.session() as s:
            from sqlalchemy import func, select

            from relay.store.db import Suppression
            assert await s.scalar(select(func.count()).select_from(Suppression)) == 2
    finally:
        holder.close()
        await db.close()


@pytest.mark.parametrize("forge", ["signature", "topic", "cert-url", "unsigned"])
async def test_a_forged_envelope_on_the_sqs_path_is_not_applied(tmp_path, moto_server, queue,
                                                               forge):
    sqs, url = queue
    body = json.loads(envelope(bounce("k@example.net")))
    if forge == "signature":  # the bounce moved to another address after signing
        body["Message"] = body["Message"].replace("k@example.net", "l@example.net")
    elif forge == "topic":
        body = json.loads(signed_envelope(bounce("k@example.net"),
                                          TopicArn="arn:aws:sns:us-east-1:123456789012:other"))
    elif forge == "cert-url":
        body = json.loads(signed_envelope(bounce("k@example.net"),
                                          SigningCertURL="https://evil.example/cert.pem"))
    else:
        body.pop("Signature")
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        assert await poll_until(ing, lambda n: ing.counts["rejected"] > 0, polls=5) == 0
    finally:
        await db.close()
    assert ing.counts["rejected"] >= 1 and ing.counts["applied"] == 0
    assert in_queue(sqs, url) == 1  # left for the redrive policy's dead-letter queue
    assert (await snapshot(tmp_path))["feedback_events"] == []


async def test_an_event_older_than_max_event_age_is_deleted_unapplied(tmp_path, moto_server,
                                                                     queue):
    import time

    sqs, url = queue
    old = notification("ses-notification-bounce-permanent-with-dsn.json", message_id="0100-o",
                       destination=["m@example.net"], at=time.time() - 15 * 86400)
    sqs.send_message(QueueUrl=url, MessageBody=envelope(old))
    sqs.send_message(QueueUrl=url, MessageBody=envelope(bounce("n@example.net")))
    ing, db = await ingester(tmp_path, moto_server, url)
    try:
        await poll_until(ing, lambda n: n == 2)
    finally:
        await db.close()
    assert ing.counts["too_old"] == 1 and ing.counts["applied"] == 1
    assert in_queue(sqs, url) == 0
    assert [r[0] for r in (await snapshot(tmp_path))["suppressions"]] == ["n@example.net"]


async def poison(db: Database) -> None:
    """A trigger in the database itself that refuses every feedback event for a
    poison@ recipient: a real error of the database, for that notification alone."""
    async with db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.recipient LIKE 'poison@%' THEN RAISE EXCEPTION 'poisoned row'; "
                "END IF; RETURN NEW; END $$")
            await conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON feedback_events FOR EACH ROW "
                "EXECUTE FUNCTION poison()")
        else:
            await conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON feedback_events "
                "WHEN NEW.recipient LIKE 'poison@%' BEGIN SELECT RAISE(ABORT, 'poisoned row'); "
                "END")


async def test_a_notification_the_database_refuses_is_left_alone_and_its_batch_applied(
        tmp_path, moto_server, queue):
    """One notification of a batch always fails: the batch is applied again in halves,
    the others are applied and deleted, only that one stays for the redrive policy."""
    sqs, url = queue
    good = [f"{c}@example.net" for c in "pqrstu"]
    for addr in (*good[:4], "poison@example.net", *good[4:]):
        sqs.send_message(QueueUrl=url, MessageBody=envelope(bounce(addr)))
    ing, db = await ingester(tmp_path, moto_server, url, max_messages=10)
    try:
        await poison(db)
        async with ing.client() as client:
            assert await ing.poll_once(client) == len(good)
    finally:
        await db.close()
    assert ing.counts["applied"] == len(good) and ing.counts["errors"] == 1
    assert in_queue(sqs, url) == 1
    rows = await snapshot(tmp_path)
    assert [r[0] for r in rows["suppressions"]] == good
    assert sorted(r[2] for r in rows["feedback_events"]) == good


async def test_a_nul_character_in_a_bounce_is_left_out_of_what_is_stored(tmp_path):
    """PostgreSQL's text columns refuse NUL: it is dropped from the detail, the message
    log's last error and the suppression's evidence, on every database alike."""
    doc = bounce("nul@example.net", message_id="0100-nul")
    doc["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "smtp; 550 5.1.1 no\u0000 such"
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        outcome = await FeedbackApplier(db).apply(parse(envelope(doc)))
    finally:
        await db.close()
    assert outcome.outcome == "applied" and outcome.suppressed == ["nul@example.net"]
    rows = await snapshot(tmp_path)
    stored = [v for t in rows.values() for r in t for v in r if isinstance(v, str)]
    assert any("550 5.1.1 no such" in v for v in stored)
    assert not any("\x00" in v for v in stored)


async def test_stats_read_while_the_ingester_thread_counts_new_kinds(tmp_path):
    """stats() runs on the main thread (/metrics) while the ingester's thread adds kinds:
    it reads a copy, never the dictionary the other thread is growing."""
    import sys
    import threading

    from relay.feedback.applier import AppliedBatch, AppliedEvent

    ing, db = await ingester(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9/q")
    await db.close()
    ing.count(AppliedBatch(applied_at=0.0, events=[
        AppliedEvent(f"k{i}", "a", "m", 0.0) for i in range(2000)]))
    started, stop, errors = threading.Event(), threading.Event(), []

    def counting() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            ing.count(AppliedBatch(applied_at=0.0, events=[AppliedEvent(f"new{i}", "a", "m",
                                                                        0.0)]))
            started.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads take turns often: the race shows at once
    thread = threading.Thread(target=counting)
    thread.start()
    try:
        started.wait(timeout=30)
        for _ in range(100):
            try:
                ing.stats()
            except RuntimeError as exc:  # dictionary changed size during iteration
                errors.append(exc)
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert started.is_set() and errors == []
    assert ing.stats()["feedback_kind_new1"] == 1.0
