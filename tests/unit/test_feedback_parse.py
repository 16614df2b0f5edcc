"""Feedback parsing by table: every documented SES sample, raw and inside an SNS envelope,
in both formats (notificationType and eventType), to the events the relay records; and
the bodies that must be left for the queue's redrive."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.feedback.parse import Event, Unparseable, bounce_kind, events, identity, parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ses"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
EVENT_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"


def sample(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def at(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def envelope(doc: dict[str, Any]) -> str:
    """The SNS envelope SQS receives with raw delivery off (SES JSON as a string)."""
    return json.dumps({"Type": "Notification", "MessageId": "m-1", "TopicArn": TOPIC,
                       "Message": json.dumps(doc), "Timestamp": "2026-11-22T00:00:00.000Z",
                       "SignatureVersion": "1", "Signature": "x"})


#: sample -> (SES type, SES MessageId, [(recipient, kind, detail, time)])
SAMPLES: dict[str, tuple[str, str, list[tuple[str, str, str, str]]]] = {
    "ses-event-bounce.json": ("Bounce", EVENT_ID, [
        ("recipient@example.com", "bounce",
         "Permanent/General 5.1.1 smtp; 550 5.1.1 user unknown", "2017-08-05T00:41:02.669Z")]),
    "ses-event-complaint.json": ("Complaint", EVENT_ID, [
        ("recipient@example.com", "complaint", "abuse", "2017-08-05T00:41:02.669Z")]),
    "ses-event-delivery.json": ("Delivery", EVENT_ID, [
        ("recipient@example.com", "delivery", "250 2.6.0 Message received",
         "2016-10-19T23:21:04.133Z")]),
    "ses-event-deliverydelay.json": ("DeliveryDelay", EVENT_ID, [
        ("recipient@example.com", "delay",
         "TransientCommunicationFailure smtp; 421 4.4.1 Unable to connect to remote host",
         "2020-06-16T00:25:40.095Z")]),
    "ses-event-reject.json": ("Reject", EVENT_ID, [
        ("sender@example.com", "reject", "rejected by SES: Bad content",
         "2016-10-14T17:38:15.211Z")]),
    "ses-event-send.json": ("Send", EVENT_ID, [
        ("recipient@example.com", "send", "", "2016-10-14T05:02:16.645Z")]),
    "ses-notification-bounce-permanent-no-dsn.json": (
        "Bounce", "00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000", [
            ("jane@example.com", "bounce", "Permanent/General", "2016-01-27T14:59:38.237Z"),
            ("richard@example.com", "bounce", "Permanent/General", "2016-01-27T14:59:38.237Z"),
        ]),
    "ses-notification-bounce-permanent-with-dsn.json": (
        "Bounce", "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000", [
            ("jane@example.com", "bounce",
             "Permanent/General 5.1.1 smtp; 550 5.1.1 <jane@example.com>... User",
             "2016-01-27T14:59:38.237Z")]),
    "ses-notification-complaint-no-feedback.json": (
        "Complaint", "0000013786031775-163e3910-53eb-4c8e-a04a-f29debf88a84-000000", [
            ("richard@example.com", "complaint", "complaint", "2016-01-27T14:59:38.237Z")]),
    "ses-notification-complaint-with-feedback.json": (
        "Complaint", "000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000", [
            ("richard@example.com", "complaint", "abuse", "2016-01-27T14:59:38.237Z")]),
    "ses-notification-delivery.json": (
        "Delivery", "0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000", [
            ("jane@example.com", "delivery", "250 ok:  Message 64111812 accepted",
             "2016-01-27T14:59:38.237Z")]),
    "synthetic-ses-notification-bounce-transient.json": (
        "Bounce", "00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000", [
            ("jane@example.com", "soft-bounce",
             "Transient/MailboxFull 4.2.2 smtp; 452 4.2.2 Mailbox full",
             "2016-01-27T14:59:38.237Z"),
            ("richard@example.com", "soft-bounce",
             "Transient/MailboxFull 4.2.2 smtp; 452 4.2.2 Mailbox full",
             "2016-01-27T14:59:38.237Z"),
        ]),
}


def test_the_table_covers_every_sample():
    assert set(SAMPLES) == {p.name for p in FIXTURES.glob("*ses-*.json")}


@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "sns-envelope"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_to_events(name, wrapped):
    kind, ses_id, expected = SAMPLES[name]
    doc = sample(name)
    note = parse(envelope(doc) if wrapped else json.dumps(doc))
    assert (note.kind, note.ses_message_id) == (kind, ses_id)
    assert note.topic_arn == (TOPIC if wrapped else "")
    assert [Event(e.recipient, e.kind, e.detail, e.at) for e in events(note)] == [
        Event(r, k, d, at(t)) for r, k, d, t in expected]


def keys(body: str | bytes) -> list[str]:
    note = parse(body)
    return [identity(e.kind, recipient=e.recipient.lower(), ses_message_id=note.ses_message_id,
                     feedback_id=e.feedback_id, at=e.at) for e in events(note)]


def as_notification(doc: dict[str, Any]) -> dict[str, Any]:
    """An event-publishing document in the notification format (the same SES event)."""
    out = dict(doc, notificationType=doc["eventType"])
    del out["eventType"]
    return out


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_one_event_has_one_key_in_either_format_wrapped_raw_or_re_encoded(name):
    doc = sample(name)
    raw = json.dumps(doc)
    same = [raw, raw.encode(), envelope(doc), json.dumps(doc, indent=2, sort_keys=True),
            json.dumps(dict(doc, extra={"unrelated": 1}))]
    if "eventType" in doc:
        same.append(envelope(as_notification(doc)))
    assert all(keys(body) == keys(raw) for body in same)


def test_the_identity_is_ses_s_not_the_json_text():
    bounce = sample("ses-event-bounce.json")
    other = copy.deepcopy(bounce)
    other["bounce"]["feedbackId"] = "another"
    assert keys(json.dumps(bounce)) != keys(json.dumps(other))
    # a delivery is its message and recipient: a second copy with another processing time
    # is the same event; another recipient or message is not
    delivery = sample("ses-event-delivery.json")
    later = copy.deepcopy(delivery)
    later["delivery"]["processingTimeMillis"] = 999
    assert keys(json.dumps(delivery)) == keys(json.dumps(later))
    later["mail"]["messageId"] = "another"
    assert keys(json.dumps(delivery)) != keys(json.dumps(later))
    # SES sends several delays for one recipient: each time is another event
    delay = sample("ses-event-deliverydelay.json")
    again = copy.deepcopy(delay)
    again["deliveryDelay"]["timestamp"] = "2020-06-16T01:25:40.095Z"
    assert keys(json.dumps(delay)) != keys(json.dumps(again))


@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000,
                                  envelope({"a": 1}).replace('{\\"a\\": 1}',
                                                             "[" * 5000 + "]" * 5000)])
def test_json_nested_too_deep_is_unparseable_never_a_recursion_error(body):
    with pytest.raises(Unparseable):
        parse(body)


@pytest.mark.parametrize("body,error", [
    ("", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"Type": "SubscriptionConfirmation", "TopicArn": "t"}', "is not a notification"),
    ('{"Type": "Notification", "TopicArn": "t", "Message": {"a": 1}}', "not a string"),
    ('{"Type": "Notification", "TopicArn": "t", "Message": "{oops"}', "not SES JSON"),
    ('{"Type": "Notification", "TopicArn": "t", "Message": "[1]"}', "not an object"),
    ('{"notificationType": "Mystery", "mail": {}}', "unknown SES notification type"),
    ('{"notificationType": "Bounce"}', "no mail.messageId"),
    ('{"eventType": "Bounce", "mail": {"messageId": ""}}', "no mail.messageId"),
    ((FIXTURES / "sns-envelope-notification.http.json").read_text(), "not SES JSON"),
])
def test_unparseable_bodies(body, error):
    with pytest.raises(Unparseable, match=error):
        parse(body)


@pytest.mark.parametrize("kind", ["AmazonSnsSubscriptionSucceeded", "Open", "Click",
                                  "Subscription"])
def test_types_that_carry_nothing_parse_to_no_events(kind):
    note = parse(json.dumps({"eventType": kind}))
    assert (note.kind, note.ses_message_id, events(note)) == (kind, "", [])


def _edit(name: str, path: tuple[str, ...], value: Any) -> str:
    doc = copy.deepcopy(sample(name))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize("body", [
    _edit("ses-notification-bounce-permanent-no-dsn.json", ("bounce",), ["a", "list"]),
    _edit("ses-notification-bounce-permanent-no-dsn.json", ("bounce", "bouncedRecipients"),
          "jane@example.com"),
    _edit("ses-notification-bounce-permanent-no-dsn.json", ("bounce", "bouncedRecipients"),
          [{"emailAddress": "no-at-sign"}]),
    _edit("ses-notification-complaint-no-feedback.json", ("complaint", "complainedRecipients"),
          None),
    _edit("ses-event-send.json", ("mail", "destination"), "recipient@example.com"),
    _edit("ses-event-reject.json", ("mail", "destination"), [42]),
])
def test_a_known_type_without_its_fields_is_unparseable_when_its_events_are_read(body):
    note = parse(body)
    with pytest.raises(Unparseable, match="malformed"):
        events(note)


@pytest.mark.parametrize("bounce_type,kind", [
    ("Permanent", "bounce"),
    ("Transient", "soft-bounce"),
    ("Undetermined", "soft-bounce"),
    ("", "soft-bounce"),
])
def test_only_a_permanent_bounce_is_a_bounce(bounce_type, kind):
    assert bounce_kind(bounce_type) == kind


def test_a_section_without_a_timestamp_takes_the_mails():
    body = _edit("ses-event-bounce.json", ("bounce", "timestamp"), None)
    assert [e.at for e in events(parse(body))] == [at("2017-08-05T00:40:02.012Z")]


@pytest.mark.parametrize("values, q, expected", [
    ([], 0.5, 0.0),
    ([3.0], 0.99, 3.0),
    ([5.0, 1.0, 3.0, 2.0, 4.0], 0.5, 3.0),
    ([float(i) for i in range(1, 101)], 0.99, 99.0),
    ([float(i) for i in range(1, 101)], 0.5, 50.0),
])
def test_lag_percentiles_by_nearest_rank(values, q, expected):
    from relay.feedback.sqs import percentile

    assert percentile(values, q) == expected
