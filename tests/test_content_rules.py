"""The content rules at DATA, over real SMTP: bare LF made CRLF (the relay's own Received
and Date too), bare CR and NUL refused, 998-octet lines, exactly one From, and the header
From held to the sender rules (smtp.allowed_sender_domains, an authenticated user's senders).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ingress import credentials as auth
from tests.ingress_server import Raw, make_ingress


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator:
    users = tmp_path / "users"
    auth.set_password(users, "alice", "correct horse", ("@example.com",))
    start = make_ingress(tmp_path, allow_plain_auth_from=("127.0.0.0/8",),
                         allowed_networks=("192.0.2.0/24",))

    def started(**fields):
        return start(handler_kw={"credentials": auth.Credentials(users)}, **fields)

    yield started
    for server in start.started:
        server.stop()


def _send(port: int, message: bytes, *, sender: bytes = b"app@example.com",
          login: bool = True) -> bytes:
    """One message over a raw session (AUTH PLAIN as alice); the reply to its final dot."""
    with Raw(port) as c:
        assert c.reply().startswith(b"220")
        assert c.cmd(b"EHLO client.example").startswith(b"250")
        if login:
            blob = base64.b64encode(b"\0alice\0correct horse")
            assert c.cmd(b"AUTH PLAIN " + blob).startswith(b"235")
        assert c.cmd(b"MAIL FROM:<" + sender + b">").startswith(b"250")
        assert c.cmd(b"RCPT TO:<to@example.net>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(message + b"\r\n.\r\n")
        return c.reply()


def test_bare_lf_message_is_stored_with_crlf_line_endings_only(ingress):
    server = ingress()
    reply = _send(server.port, b"From: app@example.com\nSubject: t\n\nline one\nline two")
    assert reply.startswith(b"250 2.0.0")
    (stored,) = server.messages()
    assert stored.count(b"\n") == stored.count(b"\r\n") == stored.count(b"\r")
    assert stored.startswith(b"Received: ")
    assert b"\r\nDate: " in stored and b"\r\nMessage-ID: " in stored
    assert stored.endswith(b"\r\n\r\nline one\r\nline two\r\n")


@pytest.mark.parametrize("message, reply", [
    (b"From: app@example.com\r\n\r\nhi\r.\r\nthere", b"550 5.5.2"),
    (b"From: app@example.com\r\nSubject: a\rBcc: x@example.net\r\n\r\nhi", b"550 5.5.2"),
    (b"From: app@example.com\r\n\r\nh\0i", b"550 5.5.2"),
    (b"From: app@example.com\r\n\r\n" + b"x" * 999, b"550 5.5.2"),
    (b"Subject: no from\r\n\r\nhi", b"550 5.6.0"),
    (b"From: app@example.com\r\nFrom: other@example.com\r\n\r\nhi", b"550 5.6.0"),
])
def test_refused_content_gets_550_and_nothing_is_spooled(ingress, message, reply):
    server = ingress()
    assert _send(server.port, message).startswith(reply)
    assert server.messages() == []


def test_a_998_octet_line_is_accepted(ingress):
    server = ingress()
    line = b"x" * 998
    assert _send(server.port, b"From: app@example.com\r\n\r\n" + line).startswith(b"250")
    (stored,) = server.messages()
    assert b"\r\n" + line + b"\r\n" in stored


def test_authenticated_user_cannot_put_another_domain_in_the_header_from(ingress):
    server = ingress()
    forged = b"From: CEO <ceo@other.example>\r\nSubject: wire the money\r\n\r\nnow"
    reply = _send(server.port, forged)
    assert reply.startswith(b"550 5.7.1") and b"ceo@other.example" in reply
    fine = b"From: Billing <billing@example.com>\r\nSubject: invoice\r\n\r\nattached"
    assert _send(server.port, fine).startswith(b"250 2.0.0")
    assert len(server.messages()) == 1


def test_allowed_sender_domains_hold_for_the_header_from(ingress):
    server = ingress(allowed_networks=("127.0.0.0/8",), allowed_sender_domains=("example.com",))
    forged = b"From: someone@other.example\r\n\r\nhi"
    assert _send(server.port, forged, login=False).startswith(b"550 5.7.1")
    fine = b"From: someone@example.com\r\n\r\nhi"
    assert _send(server.port, fine, login=False).startswith(b"250 2.0.0")


def test_800000_continuation_lines_are_accepted(ingress):
    server = ingress(max_message_size=8 * 1024 * 1024)
    message = (b"From: app@example.com\r\nSubject: folded\r\n" + b" x\r\n" * 800_000
               + b"\r\nbody")
    assert _send(server.port, message).startswith(b"250 2.0.0")
