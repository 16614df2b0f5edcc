"""SES feedback parsing: an SQS body or SNS POST body -> a Notification -> its events.

Accepts an SNS envelope (the SES JSON is a string in `Message`) or the SES JSON itself
(raw delivery), in either SES format: notifications (`notificationType`) or
configuration-set event publishing (`eventType`); events() lists what it says per
recipient, each with its identity as SES gives it (identity()), so the same event in
either format, wrapped or raw, or re-encoded, has one key. NUL characters are left out of
every text an event carries (PostgreSQL's text columns refuse them). Pure: touches no table. Called
by relay.feedback.applier, relay.feedback.sqs, relay.feedback.sns and tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

#: SES types that carry nothing for the relay (acknowledged and dropped).
IGNORED = {"AmazonSnsSubscriptionSucceeded", "Open", "Click", "Subscription"}
KNOWN = {"Bounce", "Complaint", "Delivery", "Send", "Reject", "DeliveryDelay",
         "Rendering Failure", "RenderingFailure"} | IGNORED


class Unparseable(ValueError):
    """Not an SES notification the relay understands; left for the queue's redrive."""


def loads(text: str | bytes) -> Any:
    """json.loads that refuses nesting too deep for the parser as Unparseable (Python's
    decoder raises RecursionError, which must never reach the caller)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unparseable(f"not JSON: {exc}") from None
    except RecursionError:
        raise Unparseable("JSON nested too deep") from None


@dataclass(frozen=True)
class Notification:
    #: the SES type (notificationType or eventType)
    kind: str
    ses_message_id: str
    timestamp: float
    doc: dict[str, Any] = field(repr=False)
    topic_arn: str = ""
    #: the SNS envelope around the SES JSON (None: raw delivery)
    envelope: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Event:
    """What a notification says about one recipient, in the relay's words."""

    #: the address as SES wrote it (not normalized)
    recipient: str
    #: bounce, soft-bounce, complaint, delivery, delay, reject, rendering-failure, send
    kind: str
    detail: str
    #: when it happened (the event's own timestamp, else the mail's)
    at: float
    #: the SES feedbackId of a bounce or complaint, "" for other kinds
    feedback_id: str = ""


def _timestamp(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return time.time()


def _unwrap(outer: dict[str, Any]) -> tuple[str, Any, dict[str, Any] | None]:
    """(the SNS topic or "", the SES JSON, the envelope or None) of an envelope or raw body."""
    if outer.get("Type") == "Notification" and "Message" in outer:
        text = outer["Message"]
        if not isinstance(text, str):
            raise Unparseable("SNS Message is not a string")
        try:
            doc = loads(text)
        except Unparseable as exc:
            raise Unparseable(f"SNS Message is not SES JSON: {exc}") from None
        return str(outer.get("TopicArn", "")), doc, outer
    if "Type" in outer and "TopicArn" in outer:
        raise Unparseable(f"SNS {outer['Type']} is not a notification")
    return "", outer, None


def parse(body: str | bytes) -> Notification:
    """An SQS body or SNS POST body -> Notification; raises Unparseable."""
    outer = loads(body)
    if not isinstance(outer, dict):
        raise Unparseable("not a JSON object")
    topic, doc, envelope = _unwrap(outer)
    if not isinstance(doc, dict):
        raise Unparseable("SES JSON is not an object")
    kind = doc.get("notificationType") or doc.get("eventType")
    if not isinstance(kind, str) or kind not in KNOWN:
        raise Unparseable(f"unknown SES notification type {kind!r}")
    mail = doc.get("mail")
    if kind in IGNORED:
        mail = mail if isinstance(mail, dict) else {}
    elif not isinstance(mail, dict) or not mail.get("messageId"):
        raise Unparseable("SES JSON has no mail.messageId")
    return Notification(kind=kind, ses_message_id=text(mail.get("messageId", "")),
                        timestamp=_timestamp(mail.get("timestamp", "")), doc=doc,
                        topic_arn=topic, envelope=envelope)


#: SES spells one type two ways across its formats
_TYPE_NAMES = {"Rendering Failure": "RenderingFailure"}


def text(value: Any) -> str:
    """A value as text to store: without NUL characters, which PostgreSQL refuses."""
    return str(value).replace("\x00", "")


def identity(kind: str, *, recipient: str, ses_message_id: str, feedback_id: str = "",
             at: float = 0.0) -> str:
    """The event's key: a digest of SES's identity of it, never of the JSON text.

    A bounce or complaint is its feedbackId and recipient; any other event is its type,
    the SES MessageId and the recipient, plus its time for a delay (SES sends several).
    The same event in the notification and event-publishing formats, in an SNS envelope
    or raw, or re-encoded, has the same key. `recipient` is the normalized address.
    """
    if feedback_id and kind in ("bounce", "soft-bounce", "complaint"):
        parts = ["feedback", feedback_id, recipient]
    else:
        parts = [_TYPE_NAMES.get(kind, kind), ses_message_id, recipient]
        if kind in ("delay", "bounce", "soft-bounce", "complaint"):
            parts.append(f"{at:.3f}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def event_time(n: Notification, todo: list[Event]) -> float:
    """When SES says the notification's events happened: the latest of them, else the mail's."""
    return max((e.at for e in todo), default=n.timestamp)


def bounce_kind(bounce_type: str) -> str:
    """The event kind of a bounce: only a Permanent one is a bounce; Transient and
    Undetermined ones count towards the soft-bounce limit."""
    return "bounce" if bounce_type == "Permanent" else "soft-bounce"


def _recipients(items: Any, key: str = "emailAddress") -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise Unparseable("recipient list is not a list")
    out = []
    for item in items:
        addr = item.get(key) if isinstance(item, dict) else item
        if not isinstance(addr, str) or "@" not in addr:
            raise Unparseable(f"bad recipient {addr!r}")
        out.append(item if isinstance(item, dict) else {key: addr})
    return out


def _at(section: dict[str, Any], default: float) -> float:
    """The section's own timestamp, else the mail's."""
    return _timestamp(section["timestamp"]) if section.get("timestamp") else default


Doc = dict[str, Any]


def _bounce(doc: Doc, at: float, _dest: list[Doc]) -> list[Event]:
    b = doc.get("bounce") or {}
    btype, sub = str(b.get("bounceType", "")), str(b.get("bounceSubType", ""))
    at, kind, fid = _at(b, at), bounce_kind(btype), str(b.get("feedbackId") or "")
    return [Event(r["emailAddress"], kind,
                  " ".join(x for x in (f"{btype}/{sub}", str(r.get("status", "")),
                                       str(r.get("diagnosticCode", ""))) if x), at, fid)
            for r in _recipients(b.get("bouncedRecipients"))]


def _complaint(doc: Doc, at: float, _dest: list[Doc]) -> list[Event]:
    c = doc.get("complaint") or {}
    detail = " ".join(str(x) for x in (c.get("complaintFeedbackType") or "complaint",
                                       c.get("complaintSubType") or "") if x)
    at, fid = _at(c, at), str(c.get("feedbackId") or "")
    return [Event(r["emailAddress"], "complaint", detail, at, fid)
            for r in _recipients(c.get("complainedRecipients"))]


def _delivery(doc: Doc, at: float, _dest: list[Doc]) -> list[Event]:
    d = doc.get("delivery") or {}
    at, detail = _at(d, at), str(d.get("smtpResponse", ""))
    return [Event(r, "delivery", detail, at)
            for r in (d.get("recipients") or []) if isinstance(r, str)]


def _delay(doc: Doc, at: float, _dest: list[Doc]) -> list[Event]:
    d = doc.get("deliveryDelay") or {}
    at = _at(d, at)
    return [Event(r["emailAddress"], "delay",
                  f"{d.get('delayType', '')} {r.get('diagnosticCode', '')}".strip(), at)
            for r in _recipients(d.get("delayedRecipients") or [])]


def _reject(doc: Doc, at: float, dest: list[Doc]) -> list[Event]:
    reason = str((doc.get("reject") or {}).get("reason", "rejected"))
    return [Event(r["x"], "reject", f"rejected by SES: {reason}", at) for r in dest]


def _rendering_failure(doc: Doc, at: float, dest: list[Doc]) -> list[Event]:
    detail = f"rendering failure: {(doc.get('failure') or {}).get('errorMessage', '')}"
    return [Event(r["x"], "rendering-failure", detail, at) for r in dest]


def _send(_doc: Doc, at: float, dest: list[Doc]) -> list[Event]:
    # SES accepted the message; the message log already says sent
    return [Event(r["x"], "send", "", at) for r in dest]


_EVENTS = {"Bounce": _bounce, "Complaint": _complaint, "Delivery": _delivery,
           "DeliveryDelay": _delay, "Reject": _reject, "Rendering Failure": _rendering_failure,
           "RenderingFailure": _rendering_failure, "Send": _send}


def events(n: Notification) -> list[Event]:
    """What the notification says per recipient (none for an ignored type); raises
    Unparseable when a known type lacks the fields it needs."""
    if n.kind in IGNORED:
        return []
    try:
        dest = _recipients(n.doc["mail"].get("destination") or [], "x")
        found = _EVENTS[n.kind](n.doc, n.timestamp, dest)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise Unparseable(f"malformed {n.kind}: {exc!r}") from None
    return [replace(e, recipient=text(e.recipient), detail=text(e.detail),
                    feedback_id=text(e.feedback_id)) for e in found]
