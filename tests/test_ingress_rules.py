"""Access control, sender and recipient rules, and size limits at the SMTP ingress, over sockets."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from relay.ingress import addresses
from tests.ingress_server import Raw

SENDER = "app@example.com"
MSG = (b"From: app@example.com\r\nTo: a@example.net\r\nSubject: t\r\n"
       b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <r@example.com>\r\n\r\nhi\r\n")


def test_open_relay_attempt_from_non_allowed_address_is_refused(ingress):
    server = ingress(allowed_networks=("192.0.2.0/24",))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("outside.example")
        code, reply = s.mail(SENDER)
        assert (code, reply[:5]) == (554, b"5.7.1")
        code, reply = s.rcpt("victim@example.org")
        assert code == 503 or (code, reply[:5]) == (554, b"5.7.1")
        # DATA cannot follow: no recipient was taken
        code, _ = s.docmd("DATA")
        assert code == 503
    assert server.messages() == []


def test_not_allowed_client_gets_530_when_auth_is_available(ingress, tmp_path):
    from relay.ingress.credentials import Credentials, set_password

    set_password(tmp_path / "users", "u", "pw")
    server = ingress(handler_kw={"credentials": Credentials(tmp_path / "users")},
                     allowed_networks=("192.0.2.0/24",))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("outside.example")
        code, reply = s.mail(SENDER)
        assert (code, reply[:5]) == (530, b"5.7.0")


def test_allowed_sender_domains(ingress):
    server = ingress(allowed_sender_domains=("example.com", ".example.org"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("c.example")
        for sender, want in [("app@example.com", 250), ("app@EXAMPLE.com", 250),
                             ("app@mail.example.org", 250), ("app@example.org", 250),
                             ("app@other.example", 553), ("app@sub.example.com", 553),
                             ("app@example.com.evil.test", 553)]:
            code, reply = s.mail(sender)
            assert code == want, (sender, code, reply)
            if code == 553:
                assert reply.startswith(b"5.7.1"), reply
            s.rset()


@pytest.mark.parametrize("address, code, status", [
    ("good@example.net", 250, b"2.1.5"),
    ("no-at-sign", 553, b"5.1.3"),
    ("two@@example.net", 553, b"5.1.3"),
    ("a@localhost", 553, b"5.1.3"),
    ("dot.@example.net", 553, b"5.1.3"),
    ("a@-bad-.example", 553, b"5.1.3"),
    ("\u00fcser@example.net", 553, b"5.6.7"),
    ("\u7528\u6237@example.net", 553, b"5.6.7"),
])
def test_recipient_syntax(ingress, address, code, status):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO c.example").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<app@example.com>").startswith(b"250")
        reply = c.cmd(b"RCPT TO:<" + address.encode() + b">")
        assert reply[:3] == str(code).encode() and reply[4:9] == status, reply


def test_non_ascii_sender_local_part_refused_553_5_6_7(ingress):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO c.example")
        reply = c.cmd("MAIL FROM:<j\u00f6rg@example.com>".encode())
        assert reply.startswith(b"553 5.6.7"), reply
        assert c.cmd(b"MAIL FROM:<app@example.com> SMTPUTF8").startswith(b"555 5.6.7")


def test_idn_domains_become_punycode_in_the_spool(ingress):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO c.example")
        assert c.cmd("MAIL FROM:<app@b\u00fccher.example>".encode()).startswith(b"250")
        assert c.cmd("RCPT TO:<to@m\u00fcnchen.example>".encode()).startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(MSG + b".\r\n")
        assert c.reply().startswith(b"250")
    env = json.loads(server.envelopes()[0])
    assert env["sender"] == "app@xn--bcher-kva.example"
    assert env["recipients"] == ["to@xn--mnchen-3ya.example"]


def test_smtputf8_never_advertised(ingress):
    server = ingress()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("c.example")
        assert not s.has_extn("smtputf8")
        assert s.has_extn("size") and s.has_extn("8bitmime")
        assert not s.has_extn("auth")  # no credentials file configured


def test_20000_recipient_envelope_refused_past_the_limit(ingress):
    server = ingress()  # default smtp.max_recipients = 1000
    n = 20000
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO c.example")
        assert c.cmd(b"MAIL FROM:<app@example.com>").startswith(b"250")
        # pipelined: all RCPTs at once, then read every reply
        c.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(n)))
        replies = [c.reply() for _ in range(n)]
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(MSG + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
    assert all(r.startswith(b"250 2.1.5") for r in replies[:1000])
    assert all(r.startswith(b"452 4.5.3") for r in replies[1000:]), replies[1000]
    env = json.loads(server.envelopes()[0])
    assert len(env["recipients"]) == 1000
    assert env["recipients"][-1] == "r999@example.net"


def test_size_advertised_and_declared_oversize_refused_at_mail(ingress):
    server = ingress(max_message_size=64 * 1024)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("c.example")
        assert s.esmtp_features["size"] == str(64 * 1024)
        code, reply = s.docmd(f"MAIL FROM:<app@example.com> SIZE={40 * 1024 * 1024}")
        assert (code, reply[:5]) == (552, b"5.3.4"), reply
        # the same session goes on with a message that fits
        code, _ = s.docmd(f"MAIL FROM:<app@example.com> SIZE={len(MSG)}")
        assert code == 250
        s.rcpt("a@example.net")
        assert s.data(MSG)[0] == 250


def test_undeclared_oversize_refused_552_after_data_and_nothing_kept(ingress):
    server = ingress(max_message_size=64 * 1024)
    big = MSG + (b"y" * 998 + b"\r\n") * 200
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("c.example")
        s.mail(SENDER)
        s.rcpt("a@example.net")
        code, reply = s.data(big)
        assert (code, reply[:5]) == (552, b"5.3.4"), reply
        s.rset()
        s.mail(SENDER)
        s.rcpt("a@example.net")
        assert s.data(MSG)[0] == 250
    assert len(server.messages()) == 1


@pytest.mark.parametrize("address, expect", [
    ("A.B@Example.NET", "A.B@example.net"),
    ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
    ("x@b\u00fccher.example", "x@xn--bcher-kva.example"),
])
def test_recipient_normalisation_table(address, expect):
    assert addresses.recipient(address) == expect


@pytest.mark.parametrize("domain, allowed, ok", [
    ("example.com", ("example.com",), True),
    ("Example.COM", ("example.com",), True),
    ("a.example.com", ("example.com",), False),
    ("a.example.com", (".example.com",), True),
    ("example.com", (".example.com",), True),
    ("badexample.com", (".example.com",), False),
])
def test_domain_allowed_table(domain, allowed, ok):
    assert addresses.domain_allowed(domain, allowed) is ok


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_undeclared_oversize_is_drained_not_held_in_memory(start_relay, sandbox):
    """64 MB sent against a 1 MB limit: the relay's peak memory grows far less than that."""
    relay = start_relay(sandbox.url, smtp={"max_message_size": "1MB"})
    assert relay.proc is not None
    with Raw(relay.smtp_port) as c:
        c.reply()
        c.cmd(b"EHLO c.example")
        c.cmd(b"MAIL FROM:<app@example.com>")
        c.cmd(b"RCPT TO:<a@example.net>")
        before = _peak_kb(relay.proc.pid)
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(MSG)
        chunk = (b"z" * 998 + b"\r\n") * 1024
        for _ in range(64):
            c.send(chunk)
        c.send(b".\r\n")
        assert c.reply().startswith(b"552 5.3.4")
        after = _peak_kb(relay.proc.pid)
        # the session is still usable
        assert c.cmd(b"RSET").startswith(b"250")
    assert after - before < 24 * 1024, (before, after)
    assert relay.queued("active") == [] and relay.queued("incoming") == []


def test_non_utf8_helo_is_sanitised_in_received(ingress):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO c\xff\xfe.example").startswith(b"250")
        c.cmd(b"MAIL FROM:<app@example.com>")
        c.cmd(b"RCPT TO:<a@example.net>")
        c.cmd(b"DATA")
        c.send(MSG + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
    assert server.messages()[0].startswith(b"Received: from c??.example ([127.0.0.1])\r\n")


def test_null_sender_accepted_even_with_allowed_sender_domains(ingress):
    server = ingress(allowed_sender_domains=("example.com",))
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO c.example")
        assert c.cmd(b"MAIL FROM:<>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<a@example.net>").startswith(b"250")
        c.cmd(b"DATA")
        c.send(MSG + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
    assert json.loads(server.envelopes()[0])["sender"] == ""


def test_helo_client_without_esmtp_can_send(ingress):
    server = ingress()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        assert s.helo("old.example")[0] == 250
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("a@example.net")[0] == 250
        assert s.data(MSG)[0] == 250
    assert server.messages()[0].startswith(b"Received: from old.example ([127.0.0.1])")
    assert b"with SMTP;" in server.messages()[0]
