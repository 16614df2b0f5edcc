"""SMTP smuggling: bare CR / bare LF end-of-data look-alikes never start a second message.

The byte sequences are those of the 2023-2024 SMTP smuggling advisories (SEC Consult,
CVE-2023-51764/51765/51766 and the Postfix/Sendmail/Exim notes): each is sent over a raw
socket inside one DATA, followed by a would-be second transaction; the relay must queue
exactly one message, to the first envelope only, and answer exactly one 250 for it; or,
where the look-alike holds a bare CR or a NUL (relay.ingress.content), refuse the one
message with 550 5.5.2 and queue nothing.
"""

from __future__ import annotations

import json

import pytest

from relay.ingress import content
from tests.ingress_server import Raw

SEQUENCES = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
    b"\r.\n", b"\r\n.\n\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\n..\n",
]


def refused(seq: bytes) -> bool:
    """The look-alike holds a bare CR or a NUL: the whole message is refused."""
    return content.line_endings(b"x" + seq + b"x")[1] is not None


SMUGGLED = (b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")


def _until_eof(c: Raw) -> list[bytes]:
    replies = []
    while True:
        r = c.reply()
        if not r:
            return replies
        replies.append(r)


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: repr(s)[2:-1])
def test_smuggling_sequence_yields_exactly_one_message(ingress, seq):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO client.example").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<app@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<a@example.net>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"From: app@example.com\r\nSubject: first\r\n\r\nfirst body" + seq + SMUGGLED
               + b"\r\n.\r\nQUIT\r\n")
        replies = _until_eof(c)
    # one reply for the one message, then the 221 for QUIT: nothing for the smuggled commands
    assert len(replies) == 2, replies
    assert replies[1].startswith(b"221")
    if refused(seq):
        assert replies[0].startswith(b"550 5.5.2")
        assert server.envelopes() == []
        return
    assert replies[0].startswith(b"250 2.0.0")
    envelopes = [json.loads(e) for e in server.envelopes()]
    assert len(envelopes) == 1
    assert envelopes[0]["sender"] == "app@example.com"
    assert envelopes[0]["recipients"] == ["a@example.net"]
    # the would-be second message stayed inside the first one's body
    body = server.messages()[0].split(b"\r\n\r\n", 1)[1]
    assert b"first body" in body and b"smuggled body" in body


@pytest.mark.parametrize("sep", [b"\r", b"\n"], ids=["bare-CR", "bare-LF"])
def test_bare_newline_in_commands_adds_no_recipient(ingress, sep):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        c.cmd(b"MAIL FROM:<app@example.com>")
        if sep == b"\r":
            # a bare CR does not end a command: the line is one (bad) RCPT
            reply = c.cmd(b"RCPT TO:<a@example.net>\rRCPT TO:<victim@example.org>")
            assert reply[:1] == b"5", reply
            assert c.cmd(b"RCPT TO:<a@example.net>").startswith(b"250")
        else:
            # a bare LF ends a command line (as in most servers): two separate RCPTs
            c.send(b"RCPT TO:<a@example.net>\nRCPT TO:<b@example.net>\r\n")
            assert c.reply().startswith(b"250") and c.reply().startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"From: app@example.com\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        assert c.reply().startswith(b"250 2.0.0")
    envelopes = [json.loads(e) for e in server.envelopes()]
    assert len(envelopes) == 1
    assert "victim@example.org" not in envelopes[0]["recipients"]


def test_pipelined_second_transaction_after_real_end_of_data_is_a_real_message(ingress):
    """The control case: after a real <CRLF>.<CRLF> a second transaction is legitimate."""
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        c.cmd(b"MAIL FROM:<app@example.com>")
        c.cmd(b"RCPT TO:<a@example.net>")
        c.cmd(b"DATA")
        c.send(b"From: app@example.com\r\nSubject: one\r\n\r\none\r\n.\r\n" + SMUGGLED
               + b".\r\nQUIT\r\n")
        replies = _until_eof(c)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(server.envelopes()) == 2


def test_smuggling_attempts_reach_ses_as_one_call_each(start_relay, sandbox):
    """End to end through `relay serve`: one SendEmail per message, first envelope only."""
    from tests.conftest import wait_for

    relay = start_relay(sandbox.url)
    for seq in SEQUENCES:
        with Raw(relay.smtp_port) as c:
            c.reply()
            c.cmd(b"EHLO client.example")
            c.cmd(b"MAIL FROM:<app@example.com>")
            c.cmd(b"RCPT TO:<a@example.net>")
            assert c.cmd(b"DATA").startswith(b"354")
            c.send(b"From: app@example.com\r\nSubject: e2e\r\n\r\nfirst" + seq + SMUGGLED
                   + b"\r\n.\r\nQUIT\r\n")
            first = b"550" if refused(seq) else b"250"
            assert [r[:3] for r in _until_eof(c)] == [first, b"221"]
    sent = [s for s in SEQUENCES if not refused(s)]
    wait_for(lambda: len(sandbox.state.accepted()) >= len(sent), 30)
    wait_for(lambda: not relay.queued("active") and not relay.queued("deferred"), 20)
    calls = sandbox.state.accepted()
    assert len(calls) == len(sent)
    assert all(c.raw.count(b"\n") == c.raw.count(b"\r\n") == c.raw.count(b"\r") for c in calls)
    assert all(c.recipients == ["a@example.net"] and c.sender == "app@example.com"
               for c in calls)
    assert all(b"smuggled body" in c.raw for c in calls)
