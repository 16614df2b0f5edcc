"""Hostile and broken SMTP clients: silent STARTTLS, connection floods, error loops,
malformed AUTH and clients that may not send but keep the session alive.

Real sockets against the real ingress on loopback; counts and times are bounded (a small
smtp.timeout where a test waits for the relay to give up on a client).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ingress import credentials as auth
from tests.conftest import wait_for
from tests.ingress_server import Raw, make_ca, make_ingress


@pytest.fixture
def tls(tmp_path: Path) -> dict:
    ca, cert, key = make_ca(tmp_path)
    users = tmp_path / "users"
    auth.set_password(users, "alice", "correct horse", ("@example.org",))
    return {"ca": ca, "cert": str(cert), "key": str(key), "users": users}


@pytest.fixture
def ingress(tmp_path: Path, tls: dict) -> Iterator:
    start = make_ingress(tmp_path, tls_cert=tls["cert"], tls_key=tls["key"])

    def started(**fields):
        creds = auth.Credentials(tls["users"])
        return start(handler_kw={"credentials": creds}, **fields)

    yield started
    for server in start.started:
        server.stop()


def _open(port: int, source: str = "127.0.0.1") -> Raw:
    raw = Raw.__new__(Raw)
    raw.sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                        source_address=(source, 0))
    raw.file = raw.sock.makefile("rb")
    return raw


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
