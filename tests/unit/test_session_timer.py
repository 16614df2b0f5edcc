"""The idle timeout: one timer per session, moved on by each command, 421 when it runs out.

The session runs on an event loop whose clock the test sets (a subclass of asyncio's own
loop, time() overridden), so "the client was idle for 10 s" is a statement, not a wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from relay.config import SmtpConfig
from relay.ingress.limits import ConnectionLimiter, Networks
from relay.ingress.server import IngressHandler
from relay.ingress.session import RelaySession, SessionRules
from relay.spool.spool import Spool
from tests.unit.test_session_writes import RecordingTransport


class ClockLoop(asyncio.SelectorEventLoop):
    """asyncio's loop with a clock the test moves; counts the timers it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.timers = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)


def run(coro: Callable[[ClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = ClockLoop()
    try:
        loop.run_until_complete(coro(loop))
    finally:
        loop.close()


def session(tmp_path: Path, loop: ClockLoop) -> RelaySession:
    config = SmtpConfig(hostname="relay.test", timeout=10.0, data_timeout=20.0)
    handler = IngressHandler(spool=Spool(tmp_path / "spool", fsync=False, min_free_bytes=0),
                             config=config)
    rules = SessionRules(config=config, limiter=ConnectionLimiter(total=10, per_client=10),
                         plain_auth=Networks(()), sessions=set(),
                         trusted=Networks(config.allowed_networks))
    return RelaySession(handler, rules=rules, hostname="relay.test", timeout=config.timeout,
                        loop=loop)


async def turns(n: int = 50) -> None:
    for _ in range(n):  # bounded: what is ready runs within a few loop turns
        await asyncio.sleep(0)


def test_each_command_moves_the_idle_deadline_without_a_new_timer(tmp_path):
    async def body(loop: ClockLoop) -> None:
        proto, transport = session(tmp_path, loop), RecordingTransport()
        proto.connection_made(transport)  # idle deadline 1010
        await turns()
        assert loop.timers == 1
        for at in (1004.0, 1006.0, 1008.0):
            loop.now = at
            proto.data_received(b"HELO client.test\r\n")
            await turns()
        assert loop.timers == 1  # three commands, still the one timer
        loop.now = 1011.0  # the first deadline passed: the timer moves itself to 1018
        await turns()
        assert not transport.closed
        assert loop.timers == 2
        loop.now = 1017.9
        await turns()
        assert not transport.closed
        loop.now = 1018.1  # 10 s after the last command
        await turns()
        assert transport.closed
        assert transport.writes[-1] == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
        proto.connection_lost(None)
        await turns()

    run(body)


def test_a_shorter_deadline_than_the_timer_sets_the_timer_earlier(tmp_path):
    async def body(loop: ClockLoop) -> None:
        proto, transport = session(tmp_path, loop), RecordingTransport()
        proto.connection_made(transport)
        await turns()
        loop.now = 1005.0
        proto._reset_timeout(20.0)  # the DATA phase's longer deadline: 1025
        loop.now = 1010.1
        await turns()  # the first timer moves itself to 1025
        assert not transport.closed
        loop.now = 1011.0
        proto._reset_timeout()  # back to the idle timeout: 1021, before the timer's 1025
        loop.now = 1020.9
        await turns()
        assert not transport.closed
        loop.now = 1021.1
        await turns()
        assert transport.closed
        proto.connection_lost(None)
        await turns()

    run(body)
