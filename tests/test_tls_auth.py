"""STARTTLS, implicit TLS and AUTH PLAIN/LOGIN against the credentials file, over sockets."""

from __future__ import annotations

import base64
import logging
import shutil
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.ingress import credentials as auth
from tests.conftest import ROOT
from tests.ingress_server import Raw, client_context, make_ca, tls_ingress

MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nhi\r\n"


@pytest.fixture
def tls(tmp_path: Path) -> dict:
    ca, cert, key = make_ca(tmp_path)
    users = tmp_path / "users"
    auth.set_password(users, "alice", "correct horse", ("@example.org",))
    auth.set_password(users, "bob", "battery staple")
    return {"ca": ca, "cert": str(cert), "key": str(key), "users": users}


@pytest.fixture
def ingress(tmp_path: Path, tls: dict) -> Iterator:
    yield from tls_ingress(tmp_path, tls, allowed_networks=("192.0.2.0/24",))


def test_starttls_then_auth_plain_and_login_then_mail(ingress, tls):
    server = ingress()
    for mech in ("plain", "login"):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            s.ehlo("client.example")
            assert s.has_extn("starttls") and not s.has_extn("auth")
            s.starttls(context=client_context(tls["ca"]))
            s.ehlo("client.example")
            assert sorted(s.esmtp_features["auth"].split()) == ["LOGIN", "PLAIN"]
            assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
            s.user, s.password = "bob", "battery staple"
            code, reply = s.auth(mech, getattr(s, f"auth_{mech}"), initial_response_ok=False)
            assert (code, reply[:5]) == (235, b"2.7.0")
            # the client is outside smtp.allowed_networks: only AUTH lets it send
            s.mail("bob@example.com")
            s.rcpt("to@example.net")
            assert s.data(MSG)[0] == 250
    msgs = server.messages()
    assert len(msgs) == 2 and all(b"with ESMTPSA;" in m.split(b"\r\n\r\n")[0] for m in msgs)


def test_auth_before_starttls_is_refused_and_mail_needs_auth(ingress):
    server = ingress()
    with Raw(server.port) as c:
        c.reply()
        ehlo = c.cmd(b"EHLO client.example")
        assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo
        creds = base64.b64encode(b"\0bob\0battery staple")
        assert c.cmd(b"AUTH PLAIN " + creds).startswith(b"538 5.7.11")
        assert c.cmd(b"AUTH LOGIN").startswith(b"538 5.7.11")
        assert c.cmd(b"MAIL FROM:<bob@example.com>").startswith(b"530 5.7.0")


def test_require_tls_refuses_mail_before_starttls(ingress, tls):
    server = ingress(require_tls=True, allowed_networks=("127.0.0.0/8",))
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        assert c.cmd(b"MAIL FROM:<a@example.org>").startswith(b"530 5.7.0")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.starttls(context=client_context(tls["ca"]))
        s.ehlo("client.example")
        assert s.mail("a@example.org")[0] == 250


def test_implicit_tls_listener(ingress, tls):
    server = ingress(implicit_tls=True, tls_port=0)
    assert server.tls_port
    with smtplib.SMTP_SSL("127.0.0.1", server.tls_port, timeout=30,
                          context=client_context(tls["ca"])) as s:
        s.ehlo("client.example")
        assert not s.has_extn("starttls") and s.has_extn("auth")
        assert s.login("bob", "battery staple")[0] == 235
        s.mail("bob@example.com")
        s.rcpt("to@example.net")
        assert s.data(MSG)[0] == 250
    assert b"with ESMTPSA;" in server.messages()[0]


def test_plaintext_client_cannot_speak_tls_listener(ingress, tls):
    server = ingress(implicit_tls=True, tls_port=0)
    with Raw(server.tls_port, timeout=10) as c:
        c.send(b"EHLO client.example\r\n")
        assert not c.reply().startswith(b"250")


def test_modern_tls_settings_only(ingress, tls):
    from relay.config import SmtpConfig
    from relay.ingress.tls import server_context

    ctx = server_context(SmtpConfig(tls_cert=tls["cert"], tls_key=tls["key"]))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    ciphers = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert ciphers and all("ECDHE" in c or "DHE" in c for c in ciphers)
    assert not any("CBC" in c or "RSA-AES" in c[:7] for c in ciphers)
    server = ingress()
    client = client_context(tls["ca"])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.starttls(context=client)
        assert s.sock.version() == "TLSv1.2"
        name = s.sock.cipher()[0]
        assert name.startswith("ECDHE") and ("GCM" in name or "CHACHA20" in name)


def test_per_user_allowed_senders(ingress, tls):
    server = ingress()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.starttls(context=client_context(tls["ca"]))
        s.login("alice", "correct horse")
        code, reply = s.mail("alice@example.com")
        assert (code, reply[:5]) == (553, b"5.7.1")
        assert s.mail("alice@example.org")[0] == 250


def test_plain_auth_allowed_from_listed_network_without_tls(ingress):
    server = ingress(allow_plain_auth_from=("127.0.0.1/32",))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("auth")
        assert s.login("bob", "battery staple")[0] == 235
        s.mail("bob@example.com")
        s.rcpt("to@example.net")
        assert s.data(MSG)[0] == 250
    assert b"with ESMTPA;" in server.messages()[0]


def test_50_wrong_passwords_are_delayed_then_refused(ingress, caplog):
    caplog.set_level(logging.INFO, logger="relay.smtp")
    server = ingress(allow_plain_auth_from=("127.0.0.0/8",), auth_failure_delay=0.01,
                     auth_max_failures=10, auth_lockout=600.0)
    codes: list[bytes] = []
    c = None
    try:
        for i in range(50):
            if c is None:
                c = Raw(server.port, timeout=30)
                c.reply()
                c.cmd(b"EHLO client.example")
            reply = c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0wrong %d" % i))
            assert reply, "no answer: the client would hang"
            codes.append(reply[:9])
            if i % 5 == 4:  # a new connection now and then: the count is per address
                c.close()
                c = None
        assert codes[:10] == [b"535 5.7.8"] * 10
        assert codes[10:] == [b"454 4.7.0"] * 40
        # locked out: even the right password is refused now
        if c is None:
            c = Raw(server.port, timeout=30)
            c.reply()
            c.cmd(b"EHLO client.example")
        good = base64.b64encode(b"\0bob\0battery staple")
        assert c.cmd(b"AUTH PLAIN " + good).startswith(b"454 4.7.0")
    finally:
        if c is not None:
            c.close()
    failed = [r.fields for r in caplog.records if r.getMessage() == "auth_failed"]
    delays = [f["delay"] for f in failed]
    assert len(delays) == 10 and delays[0] == 0
    assert delays[1:] == sorted(delays[1:]) and delays[-1] > delays[1] > 0
    assert sum(r.getMessage() == "auth_locked" for r in caplog.records) == 41
    # another client address is not locked out
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30,
                      source_address=("127.0.0.2", 0)) as s:
        s.ehlo("client.example")
        assert s.login("bob", "battery staple")[0] == 235


def test_failed_auth_answers_535_and_never_hangs(ingress):
    server = ingress(allow_plain_auth_from=("127.0.0.0/8",))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login("nobody", "x")
        assert exc.value.smtp_code == 535 and exc.value.smtp_error.startswith(b"5.7.8")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("bob", "wrong")
        assert s.login("bob", "battery staple")[0] == 235


def test_relay_passwd_adds_a_user_the_running_relay_accepts(ingress, tls, tmp_path):
    server = ingress(allow_plain_auth_from=("127.0.0.0/8",))
    out = subprocess.run([sys.executable, "-m", "relay", "passwd", "carol", "--file",
                          str(tls["users"])], input="new secret\n", capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "added carol" in out.stdout
    text = tls["users"].read_text()
    assert "new secret" not in text and text.count("carol:scrypt$") == 1
    assert oct(tls["users"].stat().st_mode & 0o777) == "0o600"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.login("carol", "new secret")[0] == 235
    # no file configured anywhere: a clear error
    out = subprocess.run([sys.executable, "-m", "relay", "passwd", "dave"], input="x\n",
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "smtp.auth_file" in out.stderr


def test_credentials_file_format():
    stored = auth.hash_password("pw")
    assert stored.startswith("scrypt$16384$8$1$")
    assert auth.check_password("pw", stored) and not auth.check_password("pW", stored)
    assert auth.hash_password("pw") != stored  # per-entry salt
    users = auth.parse(f"# comment\n\nu:{stored}:a@example.com, @example.org\n")
    assert users["u"].senders == ("a@example.com", "@example.org")
    assert users["u"].may_send_as("A@Example.com") and users["u"].may_send_as("x@example.org")
    assert not users["u"].may_send_as("x@example.com")
    with pytest.raises(ConfigError, match="line 1"):
        auth.parse("u:plaintext\n")
    with pytest.raises(ValueError):
        auth.set_password("/nonexistent/x", "bad:name", "pw")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_starttls_and_auth(ingress, tls):
    server = ingress()
    base = ["swaks", "--server", f"127.0.0.1:{server.port}", "--from", "bob@example.com",
            "--to", "to@example.net", "--header", "Subject: swaks", "--body", "hello"]
    auth_args = ["--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "battery staple"]
    out = subprocess.run(base + ["--tls"] + auth_args, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0" in out.stdout and "250 2.0.0" in out.stdout
    # without TLS the server does not offer AUTH, so swaks gives up before MAIL
    out = subprocess.run(base + auth_args, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "MAIL FROM" not in out.stdout
    # and without AUTH the client, outside smtp.allowed_networks, is refused
    out = subprocess.run(base + ["--tls"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "530 5.7.0" in out.stdout
    assert len(server.messages()) == 1


def test_relay_serve_wires_tls_auth_and_the_implicit_listener(start_relay, sandbox, tls):
    relay = start_relay(sandbox.url, smtp={
        "tls_cert": tls["cert"], "tls_key": tls["key"], "auth_file": str(tls["users"]),
        "implicit_tls": True, "tls_port": 0, "allowed_networks": ["192.0.2.0/24"]})
    smtps = relay.find("listening")["smtps"]
    assert smtps
    with smtplib.SMTP_SSL("127.0.0.1", int(smtps.rsplit(":", 1)[1]), timeout=30,
                          context=client_context(tls["ca"])) as s:
        assert s.login("bob", "battery staple")[0] == 235
        s.mail("bob@example.com")
        s.rcpt("to@example.net")
        assert s.data(MSG)[0] == 250
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.mail("bob@example.com")[0] == 530
    from tests.conftest import wait_for

    call = wait_for(lambda: sandbox.state.accepted(), 20)[0]
    assert b"with ESMTPSA;" in call.raw.split(b"\r\n\r\n")[0]
    assert relay.stop() == 0
