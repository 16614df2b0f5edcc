"""SES feedback: parse notifications and apply them to the suppression list and message log.

Accepts an SNS envelope (the SES JSON is a string in `Message`) or the SES JSON itself
(raw delivery), in either SES format: notifications (`notificationType`) or
configuration-set event publishing (`eventType`). apply() runs in one transaction:
writes feedback_events (keyed by a hash of the SES JSON, so a second copy changes
nothing), suppressions, bounce_counts and messages. Called by relay.feedback.sqs (SQS), the
SNS endpoint (relay.feedback.sns) and tests; imports no transport.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from relay.store.db import (
    LOCK_SES_MESSAGE,
    BounceCount,
    Database,
    FeedbackEvent,
    MessageRow,
    xact_lock,
)
from relay.store.suppression import BOUNCE, COMPLAINT, SOFT_LIMIT, normalize, suppress

log = logging.getLogger("relay.feedback")

#: SES types that carry nothing for the relay (acknowledged and dropped).
IGNORED = {"AmazonSnsSubscriptionSucceeded", "Open", "Click", "Subscription"}
KNOWN = {"Bounce", "Complaint", "Delivery", "Send", "Reject", "DeliveryDelay",
         "Rendering Failure", "RenderingFailure"} | IGNORED


class Unparseable(ValueError):
    """Not an SES notification the relay understands; left for the queue's redrive."""


@dataclass(frozen=True)
class Notification:
    key: str
    kind: str
    ses_message_id: str
    timestamp: float
    doc: dict[str, Any] = field(repr=False)
    topic_arn: str = ""


def _timestamp(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return time.time()


def parse(body: str | bytes) -> Notification:
    """An SQS body or SNS POST body -> Notification; raises Unparseable."""
    try:
        outer = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unparseable(f"not JSON: {exc}") from None
    if not isinstance(outer, dict):
        raise Unparseable("not a JSON object")
    topic = ""
    text = body if isinstance(body, str) else body.decode()
    if outer.get("Type") == "Notification" and "Message" in outer:
        topic = str(outer.get("TopicArn", ""))
        text = outer["Message"]
        if not isinstance(text, str):
            raise Unparseable("SNS Message is not a string")
        try:
            doc = json.loads(text)
        except ValueError:
            raise Unparseable("SNS Message is not SES JSON") from None
    elif "Type" in outer and "TopicArn" in outer:
        raise Unparseable(f"SNS {outer['Type']} is not a notification")
    else:
        doc = outer
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
    key = hashlib.sha256(text.encode()).hexdigest()
    return Notification(key=key, kind=kind, ses_message_id=str(mail.get("messageId", "")),
                        timestamp=_timestamp(mail.get("timestamp", "")), doc=doc,
                        topic_arn=topic)


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


@dataclass
class Applied:
    outcome: str  # applied, duplicate, ignored
    suppressed: list[str] = field(default_factory=list)
    events: int = 0


class FeedbackStore:
    """Applies notifications to the database, one transaction each."""

    def __init__(self, db: Database, *, soft_bounce_limit: int = 3) -> None:
        self.db = db
        self.soft_bounce_limit = soft_bounce_limit

    async def apply(self, n: Notification, *, now: float | None = None) -> Applied:
        if n.kind in IGNORED:
            return Applied("ignored")
        now = time.time() if now is None else now
        try:
            effects = self._effects(n)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise Unparseable(f"malformed {n.kind}: {exc!r}") from None
        async with self.db.session.begin() as s:
            seen = await s.scalar(select(FeedbackEvent.id).where(
                FeedbackEvent.event_key == n.key).limit(1))
            if seen is not None:
                return Applied("duplicate")
            result = Applied("applied")
            for rcpt, kind, status, detail, at in effects:
                addr = normalize(rcpt)
                s.add(FeedbackEvent(event_key=n.key, recipient=addr, kind=kind,
                                    ses_message_id=n.ses_message_id, detail=detail[:2000],
                                    occurred_at=at, received_at=now))
                result.events += 1
                if status:
                    await self._mark(s, n.ses_message_id, addr, status, detail, now)
                if kind == "bounce":
                    await suppress(s, addr, reason=BOUNCE, source="ses", detail=detail, now=now)
                    result.suppressed.append(addr)
                elif kind == "complaint":
                    await suppress(s, addr, reason=COMPLAINT, source="ses", detail=detail,
                                   now=now)
                    result.suppressed.append(addr)
                elif kind == "soft-bounce":
                    if await self._count(s, addr, now) >= self.soft_bounce_limit:
                        await suppress(s, addr, reason=SOFT_LIMIT, source="ses", now=now,
                                       detail=f"{self.soft_bounce_limit} consecutive transient "
                                              f"bounces; last: {detail}")
                        result.suppressed.append(addr)
                elif kind == "delivery":
                    await s.execute(delete(BounceCount).where(BounceCount.address == addr))
            await s.flush()
        return result

    def _effects(self, n: Notification) -> list[tuple[str, str, str, str, float]]:
        """(recipient, event kind, new log status or "", detail, time) per recipient."""
        doc, at = n.doc, n.timestamp
        dest = _recipients(doc["mail"].get("destination") or [], "x")
        if n.kind == "Bounce":
            b = doc.get("bounce") or {}
            btype, sub = str(b.get("bounceType", "")), str(b.get("bounceSubType", ""))
            at = _timestamp(b.get("timestamp", "")) if b.get("timestamp") else at
            kind = "bounce" if btype == "Permanent" else "soft-bounce"
            return [(r["emailAddress"], kind, "bounced",
                     " ".join(x for x in (f"{btype}/{sub}", str(r.get("status", "")),
                                          str(r.get("diagnosticCode", ""))) if x), at)
                    for r in _recipients(b.get("bouncedRecipients"))]
        if n.kind == "Complaint":
            c = doc.get("complaint") or {}
            detail = " ".join(str(x) for x in (c.get("complaintFeedbackType") or "complaint",
                                               c.get("complaintSubType") or "") if x)
            at = _timestamp(c.get("timestamp", "")) if c.get("timestamp") else at
            return [(r["emailAddress"], "complaint", "complained", detail, at)
                    for r in _recipients(c.get("complainedRecipients"))]
        if n.kind == "Delivery":
            d = doc.get("delivery") or {}
            at = _timestamp(d.get("timestamp", "")) if d.get("timestamp") else at
            detail = str(d.get("smtpResponse", ""))
            return [(r, "delivery", "delivered", detail, at)
                    for r in (d.get("recipients") or []) if isinstance(r, str)]
        if n.kind == "DeliveryDelay":
            d = doc.get("deliveryDelay") or {}
            return [(r["emailAddress"], "delay", "",
                     f"{d.get('delayType', '')} {r.get('diagnosticCode', '')}".strip(), at)
                    for r in _recipients(d.get("delayedRecipients") or [])]
        if n.kind == "Reject":
            reason = str((doc.get("reject") or {}).get("reason", "rejected"))
            return [(r["x"], "reject", "failed", f"rejected by SES: {reason}", at) for r in dest]
        if n.kind in ("Rendering Failure", "RenderingFailure"):
            f = doc.get("failure") or {}
            detail = f"rendering failure: {f.get('errorMessage', '')}"
            return [(r["x"], "rendering-failure", "failed", detail, at) for r in dest]
        # Send: SES accepted the message; the log already says sent
        return [(r["x"], "send", "", "", at) for r in dest]

    async def _mark(self, s: AsyncSession, ses_id: str, addr: str, status: str, detail: str,
                    now: float) -> None:
        if not ses_id:
            return
        # ordered with the log writer recording this MessageId (relay.store.messages)
        await xact_lock(s, LOCK_SES_MESSAGE, ses_id)
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if status != "delivered":
            values["last_error"] = detail
        await s.execute(update(MessageRow).where(
            MessageRow.ses_message_id == ses_id, MessageRow.recipient == addr).values(**values))

    async def _count(self, s: AsyncSession, addr: str, now: float) -> int:
        row = await s.get(BounceCount, addr)
        if row is None:
            row = BounceCount(address=addr, count=0, updated_at=now)
            s.add(row)
        row.count += 1
        row.updated_at = now
        return row.count


def dumps(n: Notification) -> str:
    return json.dumps(n.doc)
