"""How the SMTP session writes its replies: a multi-line reply (EHLO's) is one write.

The session is driven the way asyncio drives a protocol: connection_made with a transport,
data_received with the client's bytes. The transport records each write, so the test sees
the sends a client would get, without a socket.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from relay.config import SmtpConfig
from relay.ingress.limits import ConnectionLimiter, Networks
from relay.ingress.server import Ingress, IngressHandler
from relay.ingress.session import RelaySession, SessionRules
from relay.spool.files import MAX_PENDING_FILES
from relay.spool.record import Envelope
from relay.spool.spool import Spool


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written, one entry per write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 2525)}.get(
            name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def session(tmp_path: Path) -> RelaySession:
    config = SmtpConfig(hostname="relay.test")
    handler = IngressHandler(spool=Spool(tmp_path / "spool", fsync=False, min_free_bytes=0),
                             config=config)
    rules = SessionRules(config=config, limiter=ConnectionLimiter(total=10, per_client=10),
                         plain_auth=Networks(()), sessions=set(),
                         trusted=Networks(config.allowed_networks))
    return RelaySession(handler, rules=rules, hostname="relay.test", decode_data=False,
                        loop=asyncio.get_running_loop())


async def replies_to(proto: RelaySession, transport: RecordingTransport, line: bytes,
                     last: bytes) -> list[bytes]:
    """The writes the session makes for one command, up to the reply line starting `last`."""
    before = len(transport.writes)
    proto.data_received(line)
    for _ in range(1000):  # bounded: the session answers within a few loop turns
        if any(last in w for w in transport.writes[before:]):
            break
        await asyncio.sleep(0)
    return transport.writes[before:]


async def test_the_ehlo_reply_is_one_write_however_many_lines_it_has(tmp_path):
    proto, transport = session(tmp_path), RecordingTransport()
    proto.connection_made(transport)
    greeting = await replies_to(proto, transport, b"", b"220 ")
    assert len(greeting) == 1 and greeting[0].startswith(b"220 relay.test ")

    writes = await replies_to(proto, transport, b"EHLO client.test\r\n", b"250 ")
    assert len(writes) == 1, writes
    lines = writes[0].split(b"\r\n")[:-1]
    assert len(lines) >= 3, lines
    assert lines[0] == b"250-relay.test" and lines[-1].startswith(b"250 ")
    assert all(line.startswith(b"250-") for line in lines[:-1])

    # a one-line reply after it goes out as it is
    writes = await replies_to(proto, transport, b"MAIL FROM:<a@example.com>\r\n", b"250 ")
    assert writes == [b"250 2.1.0 Ok\r\n"]
    proto.connection_lost(None)


async def test_a_crowded_spool_takes_even_a_small_message_off_the_event_loop(tmp_path):
    """A small message is written on the loop, but not while MAX_PENDING_FILES files wait
    for a flush: then it goes to a thread, where it syncs itself, never on the loop."""
    seen: list[tuple[bool, bool]] = []  # (inline, on the loop's thread)

    class Watched(Spool):
        def prepare(self, envelope: Envelope, data: bytes, *, qid: str | None = None,
                    inline: bool = False) -> str:
            seen.append((inline, threading.current_thread() is threading.main_thread()))
            return super().prepare(envelope, data, qid=qid, inline=inline)

    spool = Watched(tmp_path / "spool", fsync=True)
    spool.ensure()
    handler = IngressHandler(spool=spool, config=SmtpConfig(hostname="relay.test"))
    env = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=1.0)
    await handler._spool(env, b"Subject: s\r\n\r\nbody\r\n", lambda b: b)
    assert seen == [(True, True)]
    for _ in range(MAX_PENDING_FILES):
        Spool.prepare(spool, env, b"Subject: s\r\n\r\nbody\r\n")
    assert spool.crowded()
    await handler._spool(env, b"Subject: s\r\n\r\nbody\r\n", lambda b: b)
    assert seen[-1] == (False, False)
    assert not spool.crowded()  # the flush took them all


class FlowTransport(RecordingTransport):
    """Counts how often the session's reader stops and starts reading from the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    def pause_reading(self) -> None:
        self.pauses += 1


async def test_a_message_is_read_without_pausing_the_socket_and_commands_keep_their_limit(
        tmp_path):
    """While DATA is read the reader holds up to DATA_LIMIT (a 20 KB message arrives in one
    piece without the socket being paused and resumed); afterwards a command line is held
    to aiosmtpd's limit again (its 500 for a line too long)."""
    config = SmtpConfig(hostname="relay.test")
    spool = Spool(tmp_path / "spool", fsync=False, min_free_bytes=0)
    spool.ensure()
    # a session as the listener makes it (from its template, with the session's reader)
    proto, transport = Ingress(IngressHandler(spool=spool, config=config), config)._plain(), (
        FlowTransport())
    proto.connection_made(transport)
    await replies_to(proto, transport, b"", b"220 ")
    await replies_to(proto, transport, b"HELO client.test\r\n", b"250 ")
    await replies_to(proto, transport, b"MAIL FROM:<a@example.com>\r\n", b"250 ")
    await replies_to(proto, transport, b"RCPT TO:<b@example.net>\r\n", b"250 ")
    await replies_to(proto, transport, b"DATA\r\n", b"354 ")
    message = b"From: a@example.com\r\n\r\n" + b"x" * 76 + b"\r\n" * 1 + (
        (b"y" * 78 + b"\r\n") * 250)
    before = len(transport.writes)
    proto.data_received(message + b".\r\n")
    for _ in range(3000):  # bounded: the spool's publish runs in a thread
        if len(transport.writes) > before:
            break
        await asyncio.sleep(0.01)
    assert transport.writes[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert transport.pauses == 0
    # over the reader's limit aiosmtpd answers before it looks at the line (a longer limit
    # would read the line and answer that its non-ASCII command is bad syntax)
    writes = await replies_to(proto, transport, b"\xff" * 1200 + b"\r\n", b"500 ")
    assert writes == [b"500 Command line too long\r\n"]
    proto.connection_lost(None)
