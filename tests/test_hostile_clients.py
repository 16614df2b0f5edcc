"""Hostile and broken SMTP clients: silent STARTTLS, connection floods, error loops,
malformed AUTH and clients that may not send but keep the session alive.

Real sockets against the real ingress on loopback; counts and times are bounded (a small
smtp.timeout where a test waits for the relay to give up on a client).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ingress import credentials as auth
from tests.conftest import wait_for
from tests.ingress_server import Raw, make_ca, tls_ingress


@pytest.fixture
def tls(tmp_path: Path) -> dict:
    ca, cert, key = make_ca(tmp_path)
    users = tmp_path / "users"
    auth.set_password(users, "alice", "correct horse", ("@example.org",))
    return {"ca": ca, "cert": str(cert), "key": str(key), "users": users}


@pytest.fixture
def ingress(tmp_path: Path, tls: dict) -> Iterator:
    yield from tls_ingress(tmp_path, tls)


def _open(port: int, source: str = "127.0.0.1") -> Raw:
    return Raw(port, source=source)


def _greeting(port: int) -> bytes:
    with _open(port) as c:
        return c.reply()


def test_200_silent_starttls_clients_then_a_normal_client_gets_220(ingress):
    server = ingress(timeout=1.0, max_connections=200, max_connections_per_client=200)
    silent: list[Raw] = []
    try:
        for _ in range(200):
            c = _open(server.port)
            silent.append(c)
            assert c.reply().startswith(b"220")
            assert c.cmd(b"EHLO silent.example").startswith(b"250")
            assert c.cmd(b"STARTTLS").startswith(b"220")
            # ... and never a ClientHello
        # the relay gives up on each one at its idle timeout: the socket is closed (EOF)
        for c in silent:
            try:
                assert c.sock.recv(4096) == b""
            except ConnectionResetError:
                pass
        assert wait_for(lambda: _greeting(server.port).startswith(b"220"), 20)
        assert server.ingress is not None
        wait_for(lambda: server.ingress.limiter.count == 0, 20)
        assert not server.ingress.sessions
    finally:
        for c in silent:
            c.close()


@pytest.mark.parametrize("then", ["hangs up", "sends garbage", "sends half a hello"])
def test_a_starttls_handshake_cut_short_returns_the_connection_slot(ingress, then):
    server = ingress(timeout=1.0, max_connections=3)
    assert server.ingress is not None
    for _ in range(5):  # more than max_connections: each slot must come back
        c = _open(server.port)
        try:
            assert c.reply().startswith(b"220")
            assert c.cmd(b"EHLO broken.example").startswith(b"250")
            assert c.cmd(b"STARTTLS").startswith(b"220")
            if then == "sends garbage":
                c.send(b"EHLO not a tls record\r\n" * 4)
            elif then == "sends half a hello":
                c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            if then != "hangs up":
                try:
                    assert c.sock.recv(4096) == b""
                except ConnectionResetError:
                    pass
        finally:
            c.close()
        wait_for(lambda: server.ingress.limiter.count == 0, 20)
    assert _greeting(server.port).startswith(b"220")


def test_connection_rate_limit_per_client_outside_the_allowed_networks(ingress):
    server = ingress(allowed_networks=("192.0.2.0/24",), connection_rate_limit=3)
    for _ in range(3):
        assert _greeting(server.port).startswith(b"220")
    with _open(server.port) as c:
        assert c.reply().startswith(b"421 4.7.0 Too many connections from your address")
        assert c.reply() == b""
    # another client address has its own count
    with _open(server.port, "127.0.0.2") as c:
        assert c.reply().startswith(b"220")


def test_clients_in_allowed_networks_are_not_rate_limited(ingress):
    server = ingress(connection_rate_limit=3)
    for _ in range(10):
        assert _greeting(server.port).startswith(b"220")


def test_errors_past_error_delay_after_are_delayed(ingress, caplog):
    caplog.set_level("INFO", logger="relay.smtp")
    server = ingress(error_delay_after=2, error_delay=3600.0, max_errors=20)

    def delayed() -> bool:
        return any(r.getMessage() == "error_delay" for r in caplog.records)

    with _open(server.port) as c:
        assert c.reply().startswith(b"220")
        assert c.cmd(b"BOGUS 1").startswith(b"500")
        assert c.cmd(b"BOGUS 2").startswith(b"500")
        assert not delayed()
        c.send(b"BOGUS 3\r\n")  # its 500 waits an hour: the test hangs up instead
        wait_for(delayed, 20)
    record = next(r for r in caplog.records if r.getMessage() == "error_delay")
    assert record.fields["errors"] == 3  # type: ignore[attr-defined]


def test_malformed_auth_counts_towards_the_lockout(ingress):
    server = ingress(allow_plain_auth_from=("127.0.0.0/8",), auth_max_failures=3,
                     auth_failure_delay=0.0)
    good = base64.b64encode(b"\0alice\0correct horse")
    with _open(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO client.example").startswith(b"250")
        assert c.cmd(b"AUTH PLAIN !!!notbase64").startswith(b"501")
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"no nul bytes")).startswith(b"501")
        assert c.cmd(b"AUTH LOGIN").startswith(b"334")
        assert c.cmd(b"*").startswith(b"501")
        # three malformed attempts: locked out, even with the right password
        assert c.cmd(b"AUTH PLAIN " + good).startswith(b"454 4.7.0")


def test_a_client_that_may_not_send_is_closed_after_max_junk_commands(ingress):
    server = ingress(allowed_networks=("192.0.2.0/24",), max_junk_commands=5)
    with _open(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO idle.example").startswith(b"250")
        for cmd in (b"NOOP", b"RSET", b"NOOP", b"HELP", b"VRFY a@example.net"):
            assert c.cmd(cmd)[:1] == b"2"
        assert c.cmd(b"NOOP").startswith(b"421 4.7.0")
        assert c.reply() == b""


def test_a_client_that_may_send_can_noop_between_messages(ingress):
    server = ingress(max_junk_commands=5)
    with _open(server.port) as c:
        c.reply()
        assert c.cmd(b"EHLO app.example").startswith(b"250")
        for _ in range(30):
            assert c.cmd(b"NOOP").startswith(b"250")
