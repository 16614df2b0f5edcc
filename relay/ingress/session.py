"""The SMTP session: aiosmtpd's protocol class with the relay's connection rules.

Connection caps and the per-client connection rate (relay.ingress.limits) at connect, reply
rewrites, the error delay and the error cap on every reply, a multi-line reply in one write
(EHLO's lines are one send, not one each), the junk-command cap for clients
that may not send, smtp.data_timeout over the whole DATA phase, DATA read in blocks
(relay.ingress.data), the idle timeout's 421, and a STARTTLS handshake cut short ending the
session. A SessionObserver (metrics) hears of each session and reply. aiosmtpd's own
per-connection set-up is made once per listener (relay.ingress.template) and the idle
timeout is one timer per session, moved on lazily by each command.
One instance per connection, built by relay.ingress.server.Ingress with its listener's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import MISSING, SMTP, syntax

from relay.config import SmtpConfig
from relay.ingress.data import NOMINAL, TOO_LONG, SessionReader, read_data
from relay.ingress.limits import ConnectionLimiter, ConnectionRate, Networks
from relay.ingress.replies import (
    CONNECTION_RATE,
    DATA_OK,
    DATA_SYNTAX,
    LINE_TOO_LONG,
    NEED_RCPT,
    NOT_ERRORS,
    QUEUED_PREFIX,
    REWRITES,
    START_DATA,
    TIMEOUT,
    TOO_BIG,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK,
    Reply,
)
from relay.ingress.template import Template
from relay.log import event

log = logging.getLogger("relay.smtp")


class SessionObserver(Protocol):
    """Told of every SMTP session and every reply it sends (metrics).

    Runs on the loop that answers SMTP, once per reply: must be cheap and must not raise.
    """

    def session_opened(self) -> None:
        """A connection was accepted (also one then refused by a connection cap)."""

    def reply_sent(self, status: str | bytes) -> None:
        """A reply line as the session pushes it (before the enhanced-status rewrite)."""


@dataclass(frozen=True, eq=False)
class SessionRules:
    """What the sessions of one listener share, built once per listener by Ingress."""

    config: SmtpConfig
    limiter: ConnectionLimiter
    #: peers that may AUTH without TLS (smtp.allow_plain_auth_from)
    plain_auth: Networks
    #: the open sessions, so that shutting down can tell each one 421
    sessions: set[RelaySession]
    #: the listener speaks TLS from the first byte, so AUTH needs no STARTTLS
    implicit_tls: bool = False
    #: connections per client address per minute (smtp.connection_rate_limit)
    rate: ConnectionRate | None = None
    #: clients that may send without AUTH (smtp.allowed_networks): no rate limit, no junk cap
    trusted: Networks | None = None
    observer: SessionObserver | None = None


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """A class's attribute names with these prefixes: what aiosmtpd's dir() scans need.

    aiosmtpd calls dir() and getattr() on every name of the session and of the handler for
    each connection (about 0.2 ms); listing only the names it looks for, once per class,
    gives it the same tables.
    """
    names = _NAMES.get((cls, prefixes))
    if names is None:
        names = _NAMES[(cls, prefixes)] = sorted(
            {n for c in cls.__mro__ for n in vars(c) if n.startswith(prefixes)})
    return names


@functools.lru_cache(maxsize=4096)
def _parse_address(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's address parse of a MAIL/RCPT argument (email's header parser, about
    0.1 ms), remembered: the same senders and recipients come again and again."""
    try:
        if arg.lstrip().startswith("<"):
            angle, rest = get_angle_addr(arg)
            return angle.addr_spec, rest
        spec, rest = get_addr_spec(arg)
        return spec.addr_spec, rest
    except HeaderParseError:
        return None, None


def write_reply(transport: asyncio.BaseTransport, reply: Reply) -> None:
    """A reply written straight to the transport, where no command is being answered
    (a connection cap, the idle timeout, shutting down)."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.write(f"{reply}\r\n".encode())


class RelaySession(SMTP):
    """aiosmtpd's SMTP protocol for one connection, under its listener's SessionRules."""

    refused = False
    counted = False
    errors = 0
    #: commands that move no mail (NOOP, RSET, VRFY, HELP) from a client that may not send
    junk = 0
    client = ""
    #: the stream reader aiosmtpd reads from (a larger limit while DATA is read)
    reader_class = SessionReader
    #: the idle deadline (loop time), and when the timer that watches it is due
    _deadline = 0.0
    _armed = math.inf

    def __init__(self, handler: Any, *, rules: SessionRules, template: Template | None = None,
                 **options: Any) -> None:
        self.rules = rules
        self.observer = rules.observer
        #: the lines of a multi-line reply (EHLO's) so far: written with its last line
        self._held: list[str] = []
        if template is not None:
            # aiosmtpd's set-up, made once for the listener (relay.ingress.template)
            template.apply(self)
        else:
            super().__init__(handler, **options)
        if self.observer is not None:
            self.observer.session_opened()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the second call, after STARTTLS, is the same client: admitted once
        if self.transport is None and not self._admit(transport):
            return
        super().connection_made(transport)

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Take a connection slot, or answer 421 and close when a cap is reached."""
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else str(peer)
        rate, trusted = self.rules.rate, self.rules.trusted
        too_fast = rate is not None and not (trusted is not None and peer in trusted) and (
            not rate.allow(self.client))
        cap = "smtp.connection_rate_limit" if too_fast else self.rules.limiter.acquire(
            self.client)
        if cap:
            self.refused = True
            event(log, "refused", level=logging.WARNING, client=self.client,
                  reason=f"{cap} reached")
            write_reply(transport, CONNECTION_RATE if too_fast else TOO_MANY_CONNECTIONS)
            transport.close()
            return False
        self.counted = True
        if self.rules.implicit_tls or peer in self.rules.plain_auth:
            self._auth_require_tls = False
        self.rules.sessions.add(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.rules.sessions.discard(self)
        if self.counted:
            self.counted = False
            self.rules.limiter.release(self.client)
        super().connection_lost(exc)

    async def push(self, status: AnyStr) -> None:
        if self.observer is not None:
            self.observer.reply_sent(status)
        if isinstance(status, str):
            line = REWRITES.get(status, status)
            if line.startswith(QUEUED_PREFIX):
                self.errors = 0
            elif line[:1] in ("4", "5") and not line.startswith(NOT_ERRORS):
                self.errors += 1
                config = self.rules.config
                if self.errors > config.error_delay_after and config.error_delay:
                    # Postfix's smtpd_error_sleep_time: a client that keeps erring waits
                    event(log, "error_delay", client=self.client, errors=self.errors,
                          seconds=config.error_delay)
                    await asyncio.sleep(config.error_delay)
            if line[3:4] == "-":
                # a continuation line: the whole reply goes out in one write (one send)
                self._held.append(line)
                return
            if self._held:
                self._held.append(line)
                line = "\r\n".join(self._held)
                self._held.clear()
            # aiosmtpd's push, less its debug log call per reply (mail.log is quiet)
            self._writer.write(
                line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n")
            await self._writer.drain()
        else:
            await super().push(status)
        if self.errors >= self.rules.config.max_errors and self.transport is not None:
            event(log, "refused", level=logging.WARNING, client=self.client,
                  reason="smtp.max_errors reached")
            self.errors = 0
            # the closing 421 answers no command: it bypasses the count and the observer
            await super().push(TOO_MANY_ERRORS.line)
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the upload read in blocks (relay.ingress.data)."""
        # the whole DATA phase, upload and spool commit, gets smtp.data_timeout
        self._reset_timeout(self.rules.config.data_timeout)
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(NEED_RCPT.line)
            return
        if arg:
            await self.push(DATA_SYNTAX.line)
            return
        await self.push(START_DATA.line)
        reader = self._reader
        phase = reader.data_phase() if isinstance(reader, SessionReader) else (
            contextlib.nullcontext())
        try:
            # lines are measured after the line endings are made CRLF (relay.ingress.content)
            with phase:
                data, state = await read_data(reader, self.data_size_limit, sys.maxsize)
        except asyncio.IncompleteReadError:
            return  # the client went away mid-message: nothing was accepted
        except asyncio.CancelledError:
            self._writer.close()
            raise
        if state != NOMINAL:
            # aiosmtpd's "552 Error: Too much mail data" goes out rewritten (REWRITES)
            await self.push(LINE_TOO_LONG.line if state == TOO_LONG else TOO_BIG.line)
            self._set_post_data_state()  # type: ignore[no-untyped-call] # aiosmtpd's
            return
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call] # aiosmtpd's
        await self.push(DATA_OK.line if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's, less the typing.Protocol class it defines on every call
        if not arg:
            return "", ""
        addr, rest = _parse_address(arg)
        if addr is None or (self.local_part_limit
                            and len(addr.rpartition("@")[0]) > self.local_part_limit):
            return None, None
        return addr, rest

    def __dir__(self) -> Iterable[str]:
        # aiosmtpd builds its verb and AUTH tables from dir() on each connection
        return hook_names(type(self), ("smtp_", "auth_"))

    async def _junk(self) -> bool:
        """Count a command that moves no mail; True when it ended the session.

        Only a client that may not send (neither in smtp.allowed_networks nor
        authenticated) is counted: past smtp.max_junk_commands it gets 421 and is closed.
        """
        limit = self.rules.config.max_junk_commands
        trusted = self.rules.trusted
        if not limit or self.session is None or self.session.authenticated or (
                trusted is not None and self.session.peer in trusted):
            return False
        self.junk += 1
        if self.junk <= limit or self.transport is None:
            return False
        event(log, "refused", level=logging.WARNING, client=self.client,
              reason="smtp.max_junk_commands reached by a client that may not send")
        # the closing 421 answers no command: it bypasses the count and the observer
        await super().push(TOO_MANY_JUNK.line)
        self.transport.close()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk():
            await super().smtp_HELP(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, and the end of the session when the handshake never ends.

        A handshake cut short without an error (the idle timeout, asyncio's handshake
        timeout, the client gone) never reaches connection_lost: the TLS layer tells only
        a protocol whose connection was made. The session ends here instead, so that its
        connection slot is returned.
        """
        await super().smtp_STARTTLS(arg)
        if self.handshake_pending() and self.transport is not None:
            self.connection_lost(None)

    def handshake_pending(self) -> bool:
        """STARTTLS was answered 220 but the TLS session is not up."""
        return self._tls_protocol is not None and (
            self.session is None or self.session.ssl is None)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, moved on lazily: one timer per session, not one per command.

        Each command only records the new deadline; the timer, when it fires before it,
        sets itself again for the rest. (aiosmtpd cancels the timer and makes a new one for
        every command, and every cancelled one stays in the loop's heap until it is due.)
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and self._armed <= deadline and not handle.cancelled():
            return
        if handle is not None:
            handle.cancel()
        self._armed = deadline
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self._deadline > self._armed:
            # a command came meanwhile: the session has until its deadline
            self._armed = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_timer)
            return
        self._armed = math.inf  # fired: a later reset sets a new timer
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # mid-handshake the transport is the TLS layer's: a plaintext 421 has no place there
        if self.transport is not None and not self.handshake_pending():
            write_reply(self.transport, TIMEOUT)
        super()._timeout_cb()  # type: ignore[no-untyped-call] # aiosmtpd's
