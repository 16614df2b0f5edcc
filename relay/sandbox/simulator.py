"""The sandbox's mailbox simulator and its SQS-compatible feedback queue.

Mail the sandbox accepts for success@, bounce@, ooto@, complaint@ or suppressionlist@
simulator.amazonses.com produces the SES notification AWS would send (Delivery, Bounce
Permanent/General, Delivery, Delivery + Complaint, Bounce Permanent/OnAccountSuppressionList)
with the real MessageId and recipient, wrapped in an SNS envelope and put on an in-memory
queue the sandbox serves with SQS's JSON protocol (ReceiveMessage, DeleteMessage), so the
relay's ingester reads it exactly as it reads AWS. Used by relay.sandbox.server.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any

from aiohttp import web

DOMAIN = "simulator.amazonses.com"
ACCOUNT = "123456789012"
VISIBILITY = 30.0

#: local part -> the notifications SES sends for it, in order
SCENARIOS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "success": (("Delivery", "", ""),),
    "ooto": (("Delivery", "", ""),),
    "bounce": (("Bounce", "Permanent", "General"),),
    "suppressionlist": (("Bounce", "Permanent", "OnAccountSuppressionList"),),
    "complaint": (("Delivery", "", ""), ("Complaint", "", "abuse")),
}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def scenario(recipient: str) -> tuple[tuple[str, str, str], ...]:
    local, _, domain = recipient.strip().lower().rpartition("@")
    if domain != DOMAIN:
        return ()
    return SCENARIOS.get(local.split("+", 1)[0], ())


def notifications(*, message_id: str, sender: str, recipients: Sequence[str], raw: bytes,
                  region: str = "us-east-1", now: float | None = None) -> list[dict[str, Any]]:
    """The SES notification documents for the simulator recipients of one SendEmail."""
    if not any(scenario(r) for r in recipients):
        return []
    now = time.time() if now is None else now
    head = BytesHeaderParser().parsebytes(raw[:65536])
    mail = {
        "timestamp": _iso(now), "messageId": message_id, "source": sender,
        "sourceArn": f"arn:aws:ses:{region}:{ACCOUNT}:identity/{sender.rpartition('@')[2]}",
        "sendingAccountId": ACCOUNT, "destination": list(recipients),
        "headersTruncated": False,
        "commonHeaders": {"from": [str(head.get("From", sender))],
                          "subject": str(head.get("Subject", "")),
                          "messageId": str(head.get("Message-ID", ""))},
    }
    docs = []
    for rcpt in recipients:
        for kind, btype, sub in scenario(rcpt):
            fid = f"{int(now * 1000):016x}-{uuid.uuid4()}-000000"
            doc: dict[str, Any] = {"notificationType": kind, "mail": mail}
            if kind == "Delivery":
                doc["delivery"] = {"timestamp": _iso(now), "processingTimeMillis": 10,
                                   "recipients": [rcpt],
                                   "smtpResponse": "250 2.6.0 Message received",
                                   "reportingMTA": "a8-1.smtp-out.amazonses.com"}
            elif kind == "Bounce":
                doc["bounce"] = {"bounceType": btype, "bounceSubType": sub, "feedbackId": fid,
                                 "timestamp": _iso(now), "reportingMTA": "dns; amazonses.com",
                                 "bouncedRecipients": [{
                                     "emailAddress": rcpt, "action": "failed", "status": "5.1.1",
                                     "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}
            else:
                doc["complaint"] = {"complainedRecipients": [{"emailAddress": rcpt}],
                                    "complaintFeedbackType": sub, "feedbackId": fid,
                                    "timestamp": _iso(now),
                                    "userAgent": "Amazon SES Mailbox Simulator"}
            docs.append(doc)
    return docs


def sandbox_topic(region: str = "us-east-1") -> str:
    return f"arn:aws:sns:{region}:{ACCOUNT}:relay-sandbox-feedback"


def sns_envelope(doc: dict[str, Any], *, region: str = "us-east-1",
                 sign: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> str:
    """The SQS body SNS delivers (raw delivery off): the SES JSON as a string in Message,
    signed by `sign` (relay.sandbox.signing) when given."""
    msg: dict[str, Any] = {
        "Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": sandbox_topic(region),
        "Message": json.dumps(doc), "Timestamp": _iso(time.time()),
        "SignatureVersion": "1", "Signature": "SANDBOX",
    }
    return json.dumps(sign(msg) if sign is not None else msg)


@dataclass
class _Msg:
    id: str
    body: str
    receipt: str = ""
    visible_at: float = 0.0
    receives: int = 0


class SqsQueue:
    """A tiny in-memory SQS queue: visibility timeout, receipt handles, delete."""

    def __init__(self) -> None:
        self._msgs: dict[str, _Msg] = {}
        #: receipt handle -> message id
        self._receipts: dict[str, str] = {}
        self._lock = threading.Lock()
        #: set when the sandbox stops: long polls answer at once
        self.closing = False

    def send(self, body: str) -> str:
        msg = _Msg(id=str(uuid.uuid4()), body=body)
        with self._lock:
            self._msgs[msg.id] = msg
        return msg.id

    def __len__(self) -> int:
        with self._lock:
            return len(self._msgs)

    def take(self, n: int, now: float) -> list[_Msg]:
        with self._lock:
            out = list(itertools.islice((m for m in self._msgs.values() if m.visible_at <= now), n))
            for m in out:
                self._receipts.pop(m.receipt, None)
                m.receipt, m.visible_at = uuid.uuid4().hex, now + VISIBILITY
                m.receives += 1
                self._receipts[m.receipt] = m.id
            return out

    def delete(self, receipt: str) -> bool:
        with self._lock:
            key = self._receipts.pop(receipt, None)
            return key is not None and self._msgs.pop(key, None) is not None

    def visible(self, now: float) -> int:
        with self._lock:
            return sum(1 for m in self._msgs.values() if m.visible_at <= now)

    async def handle(self, request: web.Request) -> web.Response:
        """POST / with X-Amz-Target AmazonSQS.<Action> (the JSON protocol botocore speaks)."""
        action = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        try:
            body = await request.json(loads=json.loads)
        except ValueError:
            body = {}
        if action == "ReceiveMessage":
            wait = min(float(body.get("WaitTimeSeconds", 0) or 0), 20.0)
            n = max(1, min(int(body.get("MaxNumberOfMessages", 1) or 1), 10))
            deadline = time.monotonic() + wait
            while True:
                msgs = self.take(n, time.time())
                if msgs or self.closing or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            return _json({"Messages": [
                {"MessageId": m.id, "ReceiptHandle": m.receipt, "Body": m.body,
                 "MD5OfBody": hashlib.md5(m.body.encode()).hexdigest()} for m in msgs]})
        if action == "DeleteMessage":
            if not self.delete(str(body.get("ReceiptHandle", ""))):
                return _json({"__type": "com.amazonaws.sqs#ReceiptHandleIsInvalid",
                              "message": "The receipt handle is not valid."}, status=400)
            return _json({})
        if action == "DeleteMessageBatch":
            ok: list[Any] = []
            failed: list[Any] = []
            for entry in body.get("Entries") or []:
                gone = self.delete(str(entry.get("ReceiptHandle", "")))
                (ok if gone else failed).append(entry.get("Id"))
            return _json({"Successful": [{"Id": i} for i in ok], "Failed": [
                {"Id": i, "SenderFault": True, "Code": "ReceiptHandleIsInvalid",
                 "Message": "The receipt handle is not valid."} for i in failed]})
        if action == "GetQueueAttributes":
            return _json({"Attributes": {
                "ApproximateNumberOfMessages": str(self.visible(time.time())),
                "ApproximateNumberOfMessagesNotVisible": str(len(self) - self.visible(
                    time.time()))}})
        if action == "GetQueueUrl":
            return _json({"QueueUrl": f"{request.url.origin()}/queue/feedback"})
        return _json({"__type": "com.amazonaws.sqs#InvalidAction",
                      "message": f"unsupported action {action!r}"}, status=400)


def _json(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(doc), status=status,
                        content_type="application/x-amz-json-1.0")


def suppressed_page(listed: dict[str, str], *, page_size: int, token: str) -> dict[str, Any]:
    """One page of ListSuppressedDestinations over the sandbox's account-level list."""
    addresses = sorted(listed)
    start = int(token) if token.isdigit() else 0
    chunk = addresses[start:start + page_size]
    doc: dict[str, Any] = {"SuppressedDestinationSummaries": [
        {"EmailAddress": a, "Reason": listed[a], "LastUpdateTime": time.time()} for a in chunk]}
    if start + page_size < len(addresses):
        doc["NextToken"] = str(start + page_size)
    return doc
