"""Feedback end to end with moto: SES notifications published to an SNS topic that an SQS
queue subscribes to, read by `relay serve`'s ingester; mail sent through moto's SESv2."""

from __future__ import annotations

import json
import uuid

import boto3
import pytest

from tests.conftest import wait_for
from tests.feedback_helpers import notification, send, statuses, suppressed

X, Y = "x@example.net", "y@example.net"


def moto_ses():
    from moto.ses.models import ses_backends

    return ses_backends["123456789012"]["us-east-1"]


@pytest.fixture
def feedback_queue(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    kw = {"region_name": "us-east-1", "endpoint_url": moto_server}
    boto3.client("sesv2", **kw).create_email_identity(EmailIdentity="example.com")
    sns, sqs = boto3.client("sns", **kw), boto3.client("sqs", **kw)
    name = f"ses-feedback-{uuid.uuid4().hex[:8]}"
    topic = sns.create_topic(Name=name)["TopicArn"]
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url,
                                   AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # raw message delivery: moto's envelopes carry no real signature (the relay verifies
    # envelopes), so the queue gets the SES JSON itself and the relay is told to expect it
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                  Attributes={"RawMessageDelivery": "true"})

    def publish(doc):
        sns.publish(TopicArn=topic, Message=json.dumps(doc))

    return {"url": url, "publish": publish, "sqs": sqs, "endpoint": moto_server}


@pytest.fixture
def relay(start_relay, feedback_queue):
    return start_relay(
        feedback_queue["endpoint"], delivery={"max_rate": 50},
        feedback={"sqs_queue_url": feedback_queue["url"],
                  "sqs_endpoint_url": feedback_queue["endpoint"], "wait_time": "1s",
                  "raw_delivery": True},
    )


def sent_id(relay, qid: str) -> str:
    return wait_for(lambda: relay.find("sent", queue_id=qid), 20)["ses_message_id"]


def test_permanent_bounce_suppresses_only_the_bounced_recipient(relay, feedback_queue):
    first = send(relay.smtp_port, [X, Y])
    ses_id = sent_id(relay, first)
    feedback_queue["publish"](notification(
        "ses-notification-bounce-permanent-no-dsn.json", message_id=ses_id,
        destination=[X, Y], recipients=[X]))
    wait_for(lambda: X in suppressed(relay), 20)
    rows = suppressed(relay)
    assert rows[X]["reason"] == "bounce" and rows[X]["source"] == "ses"
    assert Y not in rows
    assert statuses(relay, X)[first] == "bounced"
    assert statuses(relay, Y)[first] == "sent"

    moto_ses().sent_messages.clear()
    second = send(relay.smtp_port, [X, Y])
    wait_for(lambda: relay.find("sent", queue_id=second), 20)
    sent = moto_ses().sent_messages
    assert len(sent) == 1
    assert Y in sent[0].destinations and X not in sent[0].destinations
    assert relay.find("suppressed", queue_id=second) is not None
    wait_for(lambda: statuses(relay, X).get(second) == "suppressed", 10)
    assert statuses(relay, Y)[second] == "sent"


def test_three_transient_bounces_suppress_two_then_a_delivery_do_not(relay, feedback_queue):
    publish = feedback_queue["publish"]
    transient = "synthetic-ses-notification-bounce-transient.json"
    for n in range(3):
        qid = send(relay.smtp_port, [X, Y])
        ses_id = sent_id(relay, qid)
        if n < 2:
            publish(notification(transient, message_id=ses_id, destination=[X, Y]))
        else:
            # Y gets a delivery after its two soft bounces; X a third soft bounce
            publish(notification(transient, message_id=ses_id, destination=[X, Y],
                                 recipients=[X]))
            publish(notification("ses-notification-delivery.json", message_id=ses_id,
                                 destination=[X, Y], recipients=[Y]))
    wait_for(lambda: X in suppressed(relay), 20)
    assert suppressed(relay)[X]["reason"] == "soft-bounce limit"
    wait_for(lambda: statuses(relay, Y).get(qid) == "delivered", 20)
    assert Y not in suppressed(relay)


def test_complaint_suppresses_and_delivery_marks_the_row(relay, feedback_queue):
    qid = send(relay.smtp_port, [X, Y])
    ses_id = sent_id(relay, qid)
    feedback_queue["publish"](notification("ses-event-delivery.json", message_id=ses_id,
                                           destination=[X, Y], recipients=[X, Y]))
    wait_for(lambda: statuses(relay, Y).get(qid) == "delivered", 20)
    assert statuses(relay, X)[qid] == "delivered"
    feedback_queue["publish"](notification(
        "ses-notification-complaint-with-feedback.json", message_id=ses_id,
        destination=[X, Y], recipients=[Y]))
    wait_for(lambda: Y in suppressed(relay), 20)
    assert suppressed(relay)[Y]["reason"] == "complaint"
    assert X not in suppressed(relay)
    assert statuses(relay, Y)[qid] == "complained"
