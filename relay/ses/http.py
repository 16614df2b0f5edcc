"""A small HTTP/1.1 client for the one request the relay makes per message: SendEmail.

Keep-alive connections to one endpoint (plain or TLS), at most `limit` at once; a request
is written in one piece (headers and body) and its answer read by an asyncio Protocol
that understands what SES sends back: a status line, headers, and a body of
Content-Length bytes or chunked. aiohttp spent about as much CPU on its request machinery
(tracing hooks, cookie and header multidicts, payload objects, a task per write) as
signing, encoding and sending together; this does only what SendEmail needs. Failures
are OSError (ConnectionError for a broken or malformed answer) and TimeoutError, which
relay.ses.errors maps like any transport failure. Used by relay.ses.client.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
from collections.abc import Mapping
from dataclasses import dataclass

#: the largest status line plus headers accepted in an answer
MAX_HEAD = 65536
#: bodies above this are written with the loop's flow control (drain between pieces)
PIECE = 2**20


class Headers(dict[str, str]):
    """Response headers, looked up case-insensitively (names stored lower case)."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses the one answer to it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answer: asyncio.Future[Response] | None = None
        self.closed = False
        self._head: tuple[int, Headers, bool] | None = None  # status, headers, keep-alive
        self._drained: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None and not self.answer.done():
            if exc is None and self._head is not None and self._until_eof():
                self._finish(bytes(self.buf), keep=False)
            else:
                self.answer.set_exception(ConnectionResetError(
                    f"SES endpoint closed the connection{f': {exc}' if exc else ''}"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost while writing"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.answer is None or self.answer.done():
            if not self.buf.strip():
                return
            # bytes nobody asked for: this connection's framing can no longer be trusted
            self.buf.clear()
            self.close()
            return
        try:
            self._parse()
        except ConnectionError as exc:
            self.answer.set_exception(exc)
            self.close()

    # -- requests --------------------------------------------------------------------

    async def request(self, head: bytes, body: bytes, timeout: float | None) -> Response:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.answer = loop.create_future()
        self._head = None
        self.buf.clear()
        if len(body) <= PIECE:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            view = memoryview(body)
            for start in range(0, len(body), PIECE):
                self.transport.write(view[start:start + PIECE])
                if self._paused:
                    self._drained = loop.create_future()
                    await self._drained
        async with asyncio.timeout(timeout):
            return await self.answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> None:
        while self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ConnectionError("SES endpoint sent an oversized response head")
                return
            self._head = _parse_head(bytes(self.buf[:end]))
            del self.buf[:end + 4]
            if 100 <= self._head[0] < 200:
                self._head = None  # an interim answer (100 Continue): the real one follows
        status, headers, _ = self._head
        if status in (204, 304):
            self._finish(b"", keep=True)
            return
        if "chunked" in (headers.get("transfer-encoding") or "").lower():
            body = _dechunk(self.buf)
            if body is not None:
                self._finish(body, keep=True)
            return
        length = headers.get("content-length")
        if length is None:
            return  # until the connection closes (connection_lost)
        try:
            n = int(length)
        except ValueError:
            raise ConnectionError(f"SES endpoint sent Content-Length {length!r}") from None
        if len(self.buf) >= n:
            self._finish(bytes(self.buf[:n]), keep=len(self.buf) == n)

    def _until_eof(self) -> bool:
        assert self._head is not None
        headers = self._head[1]
        return "content-length" not in headers and "transfer-encoding" not in headers

    def _finish(self, body: bytes, *, keep: bool) -> None:
        assert self._head is not None and self.answer is not None
        status, headers, alive = self._head
        self.buf.clear()
        if not (keep and alive):
            self.close()
        self.answer.set_result(Response(status, headers, body))


def _parse_head(raw: bytes) -> tuple[int, Headers, bool]:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"SES endpoint sent no HTTP status line: {lines[0][:80]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ConnectionError(f"SES endpoint sent a malformed header: {line[:80]!r}")
        key = name.strip().decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    connection = (headers.get("connection") or "").lower()
    alive = parts[0] == b"HTTP/1.1" and "close" not in connection
    return int(parts[1]), headers, alive


def _dechunk(buf: bytearray) -> bytes | None:
    """The body of a complete chunked answer in buf, or None while it is incomplete."""
    out = bytearray()
    pos = 0
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        try:
            size = int(bytes(buf[pos:end]).split(b";")[0], 16)
        except ValueError:
            raise ConnectionError("SES endpoint sent a malformed chunk size") from None
        pos = end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            return bytes(out) if trailer_end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


class HttpPool:
    """Keep-alive connections to one host, at most `limit` open at once."""

    def __init__(self, *, host: str, port: int, ssl: ssl_module.SSLContext | None,
                 limit: int, connect_timeout: float | None, read_timeout: float | None
                 ) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(limit)
        self._open: set[_Connection] = set()

    @property
    def idle(self) -> int:
        """Open connections waiting for a request."""
        return sum(1 for conn in self._idle if not conn.closed)

    async def post(self, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        head = "".join([f"POST {target} HTTP/1.1\r\n",
                        *(f"{k}: {v}\r\n" for k, v in headers.items()),
                        f"Content-Length: {len(body)}\r\n\r\n"]).encode("latin-1")
        async with self._slots:
            conn = await self._connection()
            try:
                answer = await conn.request(head, body, self.read_timeout)
            except BaseException:
                conn.close()
                self._open.discard(conn)
                raise
            if conn.closed:
                self._open.discard(conn)
            else:
                self._idle.append(conn)
            return answer

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely closed by now
            if not conn.closed:
                return conn
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None)
        self._open.add(conn)
        return conn

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run
