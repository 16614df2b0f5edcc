"""Delivery status notifications (RFC 3464) for permanently failed mail.

Builds the multipart/report message telling the envelope sender which recipients failed
and why, with the original headers attached. build() is pure; DsnWriter queues the DSN
(reads failed/, writes active/) and is the delivery pool's on_failed, built by
relay.service when delivery.dsn_from is set. Never for a null sender (a DSN is never
answered with a DSN).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time

from relay.delivery.ports import QueuedListener
from relay.log import event
from relay.spool.record import FAILED, Envelope, Record, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.service")


def should_notify(record: Record, dsn_from: str) -> bool:
    return bool(dsn_from) and bool(record.envelope.sender)


def build(record: Record, original: bytes, *, dsn_from: str, reporting_mta: str,
          now: float | None = None) -> bytes:
    """The DSN for a failed record, addressed to its envelope sender."""
    now = time.time() if now is None else now
    failed = {r: res for r, res in record.results.items() if res.get("status") == FAILED}
    headers_only = original.split(b"\r\n\r\n", 1)[0] + b"\r\n"

    boundary = f"=_relay_dsn_{record.id}"
    human = [
        f"This is the mail relay at {reporting_mta}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
        *(f"  <{r}>: {_clean(res.get('reason', 'delivery failed'))}" for r, res in failed.items()),
    ]
    status = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relay-Queue-ID: {record.id}",
        f"Arrival-Date: {email.utils.formatdate(record.envelope.received_at)}",
    ]
    for rcpt, res in failed.items():
        reason = _clean(res.get("reason", "delivery failed"))
        status += [
            "",
            f"Final-Recipient: rfc822; {rcpt}",
            "Action: failed",
            f"Status: {'4.4.7' if reason.startswith('expired') else '5.0.0'}",
            f"Diagnostic-Code: smtp; {reason}",
        ]
    domain = dsn_from.rpartition("@")[2] or reporting_mta
    head = [
        f"From: Mail Delivery System <{dsn_from}>",
        f"To: <{record.envelope.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: {email.utils.make_msgid(domain=domain)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(head).encode() + b"\r\n" + headers_only
    return text + f"\r\n--{boundary}--\r\n".encode()


def _clean(value: object) -> str:
    return " ".join(str(value).split()).encode("ascii", "replace").decode()


class DsnWriter:
    """Queues the DSN for a message that failed for good (the pool's on_failed), and tells
    the QueuedListener of it like any message the ingress queued. Reads failed/, writes
    active/ through Spool.accept."""

    def __init__(self, *, spool: Spool, listener: QueuedListener, dsn_from: str,
                 reporting_mta: str) -> None:
        self.spool = spool
        self.listener = listener
        self.dsn_from = dsn_from
        self.reporting_mta = reporting_mta

    async def failed(self, record: Record, reason: str) -> None:
        if not should_notify(record, self.dsn_from):
            return
        original = await asyncio.to_thread(self.spool.read_message, State.FAILED, record.id)
        body = build(record, original, dsn_from=self.dsn_from, reporting_mta=self.reporting_mta)
        envelope = Envelope(sender="", recipients=(record.envelope.sender,),
                            received_at=time.time(), client="relay-dsn")
        qid = await asyncio.to_thread(self.spool.accept, envelope, body)
        event(log, "dsn_queued", queue_id=qid, original_queue_id=record.id,
              recipient=record.envelope.sender)
        self.listener.queued(qid)
