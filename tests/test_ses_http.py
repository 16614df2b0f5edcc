"""relay.ses.http against a real loopback server that answers from a script.

Each answer is raw bytes on the wire, so the framings SES and proxies in front of it may
use are all exercised: Content-Length, chunked, read-until-close, an interim 100 Continue
before the answer, Connection: close,
HTTP/1.0, an answer split into single bytes, an idle connection closed by the server,
bytes nobody asked for, and answers that are not HTTP. The pool must hand back exactly
the body sent, reuse a connection only when the answer allows it, and fail a request
with ConnectionError (never hang, never read the next answer as this one's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from relay.ses.http import HttpPool


def answer(body: bytes = b'{"MessageId":"m"}', *, status: str = "200 OK",
           extra: str = "", version: str = "HTTP/1.1", length: bool = True) -> bytes:
    head = f"{version} {status}\r\nContent-Type: application/json\r\n{extra}"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class Scripted:
    """A loopback HTTP server: reads each request whole, answers with the next script
    entry (bytes; then closes if `close` is in the entry's tuple), counts connections."""

    def __init__(self, script: Sequence[bytes | tuple[bytes, str]]) -> None:
        self.script = list(script)
        self.connections = 0
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.script:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.bodies.append(await reader.readexactly(length))
                entry = self.script.pop(0)
                data, how = entry if isinstance(entry, tuple) else (entry, "")
                if how == "bytewise":
                    for i in range(len(data)):
                        writer.write(data[i:i + 1])
                        await writer.drain()
                else:
                    writer.write(data)
                    await writer.drain()
                if how == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def pool(port: int) -> HttpPool:
    return HttpPool(host="127.0.0.1", port=port, ssl=None, limit=4, connect_timeout=5,
                    read_timeout=5)


async def post(p: HttpPool, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await p.post("/v2/email/outbound-emails", {"Host": "x"}, body)
    return resp.status, resp.body


async def test_keep_alive_answers_reuse_one_connection_and_bodies_arrive_whole():
    big = b"x" * (3 * 2**20 + 7)  # over PIECE: written in pieces with flow control
    async with Scripted([answer(), answer(b'{"MessageId":"n"}')]) as srv:
        p = pool(srv.port)
        assert await post(p) == (200, b'{"MessageId":"m"}')
        assert await post(p, big) == (200, b'{"MessageId":"n"}')
        await p.close()
    assert srv.connections == 1
    assert srv.bodies == [b"{}", big]


@pytest.mark.parametrize("framing", ["chunked", "bytewise", "until-close", "interim"])
async def test_every_framing_gives_the_same_body(framing):
    body = b'{"MessageId":"0100-chunked-id"}'
    if framing == "chunked":
        wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\n" + body[:5] + b"\r\n" + f"{len(body) - 5:x}".encode() + b"\r\n"
                + body[5:] + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
        entry: bytes | tuple[bytes, str] = (wire, "")
    elif framing == "bytewise":
        entry = (answer(body), "bytewise")
    elif framing == "interim":
        entry = (b"HTTP/1.1 100 Continue\r\n\r\n" + answer(body), "")
    else:
        entry = (answer(body, length=False), "close")
    async with Scripted([entry, answer()]) as srv:
        p = pool(srv.port)
        assert await post(p) == (200, body)
        assert await post(p) == (200, b'{"MessageId":"m"}')
        await p.close()
    assert srv.connections == (2 if framing == "until-close" else 1)


@pytest.mark.parametrize("closing", ["connection-close", "http-1.0", "server-closes-idle"])
async def test_a_connection_the_answer_ends_is_not_used_again(closing):
    first: bytes | tuple[bytes, str]
    if closing == "connection-close":
        first = answer(extra="Connection: close\r\n")
    elif closing == "http-1.0":
        first = answer(version="HTTP/1.0")
    else:
        first = (answer(), "close")  # keep-alive said, then closed while idle
    async with Scripted([first, answer()]) as srv:
        p = pool(srv.port)
        assert (await post(p))[0] == 200
        for _ in range(1000):  # until the server's close has arrived
            if p.idle == 0:
                break
            await asyncio.sleep(0.01)
        assert p.idle == 0
        assert (await post(p))[0] == 200
        await p.close()
    assert srv.connections == 2


async def test_an_error_status_comes_back_with_its_headers_case_insensitive():
    wire = answer(b'{"message":"slow down"}', status="429 Too Many Requests",
                  extra="x-amzn-ErrorType: TooManyRequestsException:http://internal\r\n")
    async with Scripted([wire]) as srv:
        p = pool(srv.port)
        resp = await p.post("/", {"Host": "x"}, b"{}")
        await p.close()
    assert resp.status == 429
    assert resp.headers["X-Amzn-ErrorType"].startswith("TooManyRequestsException")
    assert resp.headers.get("X-AMZN-ERRORTYPE") == resp.headers["x-amzn-errortype"]


@pytest.mark.parametrize("wire", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_an_answer_that_is_not_http_fails_the_request(wire):
    async with Scripted([wire, answer()]) as srv:
        p = pool(srv.port)
        with pytest.raises(ConnectionError):
            await post(p)
        assert (await post(p))[0] == 200  # on a new connection
        await p.close()
    assert srv.connections == 2


async def test_a_connection_closed_mid_answer_fails_the_request():
    async with Scripted([(answer(b"0123456789")[:-4], "close")]) as srv:
        p = pool(srv.port)
        with pytest.raises(ConnectionResetError):
            await post(p)
        await p.close()


async def test_bytes_after_the_answer_retire_the_connection():
    async with Scripted([answer() + b"HTTP/1.1 200 OK\r\n", answer()]) as srv:
        p = pool(srv.port)
        assert (await post(p))[0] == 200
        assert (await post(p))[0] == 200
        await p.close()
    assert srv.connections == 2


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_send_raw_over_tls_checks_the_endpoints_certificate(tmp_path, trusted):
    """SES is HTTPS: SesClient's pool speaks TLS to the endpoint it resolved, verifying
    it against the session's ca_bundle (AWS_CA_BUNDLE); an endpoint it cannot verify is a
    transient failure, and nothing is sent to it."""
    import ssl

    import aiobotocore.session

    from relay.config import SesConfig
    from relay.errors import TransientError
    from relay.ses.client import SesClient
    from tests.ingress_server import make_ca

    ca, cert, key = make_ca(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = Scripted([answer(b'{"MessageId":"tls-1"}')])
    srv.server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=server_ctx)
    session = aiobotocore.session.get_session()
    if trusted:
        session.set_config_variable("ca_bundle", str(ca))
    try:
        async with SesClient(SesConfig(region="us-east-1"),
                             endpoint_url=f"https://localhost:{srv.port}",
                             static_credentials=("t", "t"), botocore_session=session) as ses:
            send = ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                raw=b"Subject: t\r\n\r\nbody\r\n")
            if trusted:
                assert await send == "tls-1"
                assert b'"ToAddresses":["b@example.net"]' in srv.bodies[0]
            else:
                with pytest.raises(TransientError):
                    await send
                assert srv.bodies == []
    finally:
        await srv.__aexit__()
