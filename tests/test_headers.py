"""Header changes at acceptance: Bcc removed, Date and Message-ID added when missing,
the relay's Received line first; the rest of the message byte for byte."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from relay.ingress import headers
from tests.conftest import wait_for

RECEIVED = "Received: from c.example ([127.0.0.1])\n\tby relay.example (relay) with ESMTP;\n\tX"
NOW = 1_790_000_000.0


def prep(data: bytes) -> bytes:
    return headers.prepare(data, received=RECEIVED, hostname="relay.example", now=NOW)


def strip_received(out: bytes, nl: bytes = b"\r\n") -> bytes:
    head = RECEIVED.replace("\n", nl.decode()).encode() + nl
    assert out.startswith(head)
    return out[len(head):]


FULL = (b"From: a@example.com\r\nTo: b@example.net\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <x@example.com>\r\n"
        b"X-Long: one\r\n  two\r\n\tthree\r\n\r\nbody\r\nBcc: stays in the body\r\n")


def test_complete_message_only_gets_received():
    assert strip_received(prep(FULL)) == FULL


@pytest.mark.parametrize("bcc", [
    b"Bcc: hidden@example.org\r\n",
    b"BCC: hidden@example.org,\r\n  other@example.org\r\n",
    b"bcc:\r\n",
    b"Bcc : hidden@example.org\r\n",
])
def test_bcc_field_removed_with_its_continuation_lines(bcc):
    head, body = FULL.split(b"\r\n\r\n", 1)
    data = head.replace(b"Subject:", bcc + b"Subject:") + b"\r\n\r\n" + body
    assert strip_received(prep(data)) == FULL


def test_missing_date_and_message_id_added_at_end_of_header_block():
    data = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    out = strip_received(prep(data))
    head, body = out.split(b"\r\n\r\n", 1)
    assert body == b"body\r\n"
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"From: a@example.com", b"Subject: s"]
    assert lines[2] == b"Date: " + headers.rfc5322_date(NOW).encode()
    assert lines[3].startswith(b"Message-ID: <") and lines[3].endswith(b"@relay.example>")
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Date"].datetime.timestamp() == NOW
    assert prep(data) != prep(data)  # a fresh Message-ID each time


def test_bare_lf_message_keeps_its_line_endings():
    data = b"From: a@example.com\nBcc: h@example.org\n\nbody\n"
    out = strip_received(prep(data), b"\n")
    assert b"\r" not in out
    assert out.startswith(b"From: a@example.com\nDate: ") and out.endswith(b"\n\nbody\n")
    assert b"Bcc" not in out


def test_message_without_header_block_gets_one():
    out = strip_received(prep(b"just a body line\r\n"))
    assert out.startswith(b"Date: ") and out.endswith(b"\r\n\r\njust a body line\r\n")


def test_end_to_end_bcc_removed_and_received_added(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    data = (b"From: app@example.com\r\nTo: to@example.net\r\nBcc: hidden@example.org\r\n"
            b"Subject: bcc\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("app@example.com")
        s.rcpt("to@example.net")
        s.rcpt("hidden@example.org")
        assert s.data(data)[0] == 250
    call = wait_for(lambda: sandbox.state.accepted(), 20)[0]
    assert sorted(call.recipients) == ["hidden@example.org", "to@example.net"]
    assert call.raw.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby ")
    assert b"hidden@example.org" not in call.raw
    parsed = email.message_from_bytes(call.raw, policy=email.policy.default)
    assert parsed["Date"] and parsed["Message-ID"] and parsed["Bcc"] is None
    assert call.raw.endswith(b"Subject: bcc\r\n" + b"Date: " + parsed["Date"].encode()
                             + b"\r\nMessage-ID: " + parsed["Message-ID"].encode()
                             + b"\r\n\r\nbody\r\n")
