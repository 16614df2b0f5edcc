"""Connection caps, the per-session error cap, command/data timeouts, AUTH throttling, and
the network check behind smtp.allowed_networks and smtp.allow_plain_auth_from."""

from __future__ import annotations

import pytest

from relay.ingress.limits import AuthThrottle, ConnectionLimiter, ConnectionRate, Networks
from tests.ingress_server import Raw


def _open(port: int, source: str = "127.0.0.1") -> Raw:
    return Raw(port, source=source)


def test_per_client_connection_cap_answers_421(ingress):
    server = ingress(max_connections_per_client=2)
    a, b = _open(server.port), _open(server.port)
    try:
        assert a.reply().startswith(b"220") and b.reply().startswith(b"220")
        with _open(server.port) as c:
            assert c.reply().startswith(b"421 4.7.0")
            assert c.reply() == b""  # and the connection is closed
        # another client address still gets in
        with _open(server.port, "127.0.0.2") as d:
            assert d.reply().startswith(b"220")
        a.cmd(b"QUIT")
        a.close()
        # a freed slot can be taken again
        def fresh() -> bytes:
            with _open(server.port) as e:
                return e.reply()
        from tests.conftest import wait_for
        wait_for(lambda: fresh().startswith(b"220"), 10)
    finally:
        a.close()
        b.close()


def test_total_connection_cap_answers_421(ingress):
    server = ingress(max_connections=3)
    held = [_open(server.port, f"127.0.0.{i}") for i in (1, 2, 3)]
    try:
        for h in held:
            assert h.reply().startswith(b"220")
        with _open(server.port, "127.0.0.4") as c:
            assert c.reply().startswith(b"421 4.7.0")
    finally:
        for h in held:
            h.close()


def test_too_many_errors_closes_the_session_with_421(ingress):
    server = ingress(max_errors=5)
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        replies = [c.cmd(b"BOGUS %d" % i) for i in range(4)]
        assert all(r.startswith(b"500") for r in replies)
        c.send(b"RCPT TO:<a@example.net>\r\n")
        assert c.reply().startswith(b"503")
        assert c.reply().startswith(b"421 4.7.0")
        assert c.reply() == b""


def test_recipient_limit_replies_do_not_count_as_errors(ingress):
    server = ingress(max_errors=3, max_recipients=2)
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        c.cmd(b"MAIL FROM:<app@example.com>")
        replies = [c.cmd(b"RCPT TO:<r%d@example.net>" % i) for i in range(10)]
        assert [r[:3] for r in replies] == [b"250"] * 2 + [b"452"] * 8
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"From: app@example.com\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        assert c.reply().startswith(b"250 2.0.0")


def test_idle_client_gets_421_timeout_and_is_closed(ingress):
    server = ingress(timeout=0.5)
    with Raw(server.port) as c:
        assert c.reply().startswith(b"220")
        assert c.reply().startswith(b"421 4.4.2")  # bounded by the socket's 30 s timeout
        assert c.reply() == b""


def test_stalled_data_transfer_times_out(ingress):
    server = ingress(timeout=60.0, data_timeout=0.5)
    with Raw(server.port) as c:
        c.reply()
        c.cmd(b"EHLO client.example")
        c.cmd(b"MAIL FROM:<app@example.com>")
        c.cmd(b"RCPT TO:<a@example.net>")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"Subject: x\r\n\r\nhalf a mess")
        assert c.reply().startswith(b"421 4.4.2")
    assert server.messages() == []


def test_connection_limiter_table():
    lim = ConnectionLimiter(total=3, per_client=2)
    assert lim.acquire("a") == "" and lim.acquire("a") == ""
    assert lim.acquire("a") == "smtp.max_connections_per_client"
    assert lim.acquire("b") == ""
    assert lim.acquire("c") == "smtp.max_connections"
    lim.release("a")
    assert lim.acquire("c") == "" and lim.count == 3
    for who in ("a", "b", "c"):
        lim.release(who)
    assert lim.count == 0 and not lim.open


def test_auth_throttle_delays_grow_then_lockout_expires():
    now = [1000.0]
    t = AuthThrottle(delay=1.0, max_failures=4, lockout=60.0, clock=lambda: now[0])
    assert [t.failure("ip") for _ in range(3)] == [0.0, 1.0, 2.0]
    assert t.locked("ip") == 0
    t.failure("ip")
    assert t.locked("ip") == 60.0 and t.locked("other") == 0
    now[0] += 59
    assert t.locked("ip") == pytest.approx(1.0)
    now[0] += 2
    assert t.locked("ip") == 0
    # failures older than the lockout window are forgotten
    assert t.failure("ip") == 0.0
    t.failure("ip")
    t.success("ip")
    assert t.failure("ip") == 0.0


def test_auth_throttle_delay_is_capped():
    t = AuthThrottle(delay=10.0, max_failures=100, lockout=60.0, clock=lambda: 0.0)
    assert max(t.failure("ip") for _ in range(20)) == 30.0


@pytest.mark.parametrize(("networks", "peer", "inside"), [
    (("127.0.0.0/8",), ("127.0.0.1", 40000), True),
    (("127.0.0.0/8",), ("10.0.0.1", 40000), False),
    (("10.0.0.0/8", "192.168.1.0/24"), ("192.168.1.7", 25), True),
    # an IPv4 client on a dual-stack socket is judged as IPv4
    (("10.0.0.0/8",), ("::ffff:10.1.2.3", 25, 0, 0), True),
    (("::1/128",), ("::1", 25, 0, 0), True),
    (("::1/128",), ("127.0.0.1", 25), False),
    # host bits set in the configured network are tolerated, as config.check allows
    (("10.1.2.3/8",), ("10.200.0.1", 25), True),
    (("0.0.0.0/0",), ("203.0.113.9", 25), True),
    # no networks, a Unix socket, no peer, an unparsable one: never inside
    ((), ("127.0.0.1", 25), False),
    (("0.0.0.0/0",), "/run/relay.sock", False),
    (("0.0.0.0/0",), None, False),
    (("0.0.0.0/0",), (), False),
    (("0.0.0.0/0",), ("not-an-address", 25), False),
    (("0.0.0.0/0",), (None, 25), False),
])
def test_networks_table(networks, peer, inside):
    assert (peer in Networks(networks)) is inside


def test_networks_answer_the_same_when_asked_again_and_past_their_memory():
    """Answers are remembered per address: asking again (each command does) changes
    nothing, an address is judged alone (not by its port), and past Networks.MEMORY
    addresses the table starts again without a wrong answer."""
    nets = Networks(("10.0.0.0/8",))
    for _ in range(3):
        assert ("10.1.2.3", 25) in nets
        assert ("10.1.2.3", 26) in nets
        assert ("192.0.2.1", 25) not in nets
        assert ("not-an-address", 25) not in nets
    for i in range(Networks.MEMORY + 10):
        host = f"10.0.{i // 256 % 256}.{i % 256}" if i % 2 else f"192.0.{i // 256 % 256}.{i % 256}"
        assert ((host, 25) in nets) is bool(i % 2)
    assert ("192.0.2.1", 25) not in nets and ("10.1.2.3", 25) in nets


@pytest.mark.parametrize("limit, attempts, allowed", [
    # (seconds after the first connection of each attempt) -> admitted?
    (3, [0, 1, 2, 3], [True, True, True, False]),
    (3, [0, 1, 2, 59.9, 60, 61, 62, 63], [True] * 3 + [False] + [True] * 3 + [False]),
    (0, [0] * 50, [True] * 50),
    (1, [0, 0, 120], [True, False, True]),
])
def test_connection_rate_table(limit, attempts, allowed):
    now = [0.0]
    rate = ConnectionRate(limit, window=60.0, clock=lambda: now[0])
    got = []
    for t in attempts:
        now[0] = t
        got.append(rate.allow("192.0.2.1"))
    assert got == allowed
    now[0] = 0.0
    assert rate.allow("192.0.2.2")  # another client has its own count
