"""The SQS ingester against moto's SQS: idempotent, deletes only after commit, leaves
garbage for the redrive policy; and the parser on every documented sample."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest

from relay.feedback.applier import FeedbackApplier
from relay.feedback.parse import Unparseable, parse
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
