"""Delivery status notifications (RFC 3464) for permanently failed mail.

Builds the multipart/report message telling the envelope sender which recipients failed
and why, with the original headers attached. Pure: returns bytes for the spool; never
called for a null sender (a DSN is never answered with a DSN). Used by relay.service
when delivery.dsn_from is set.
"""

from __future__ import annotations

import email.utils
import time

from relay.spool.spool import FAILED, Record


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
