"""The SMTP session: aiosmtpd's protocol class with the relay's connection rules.

Connection caps (relay.ingress.limits) at connect, reply rewrites and the error cap on every reply,
smtp.data_timeout over the whole DATA phase, DATA read in blocks (relay.ingress.data), and the
idle timeout's 421. Built once per listener by relay.ingress.server.Ingress.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, syntax

from relay.ingress.data import NOMINAL, TOO_LONG, read_data
from relay.ingress.server import (
    NOT_ERRORS,
    REWRITES,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    Ingress,
    _names,
    log,
)
from relay.log import event


@functools.lru_cache(maxsize=4096)
def _parse_address(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's address parse of a MAIL/RCPT argument (email's header parser, about
    0.1 ms), remembered: the same senders and recipients come again and again."""
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    return address.addr_spec, rest


def session_class(ingress: Ingress, implicit_tls: bool) -> type[SMTP]:
    """The aiosmtpd protocol class for one listener, built once (not per connection)."""
    config = ingress.config

    class _SMTP(SMTP):
        refused = False
        counted = False
        errors = 0
        client = ""

        def connection_made(self, transport: Any) -> None:
            if self.transport is None:  # not the second call after STARTTLS
                peer = transport.get_extra_info("peername")
                self.client = peer[0] if isinstance(peer, tuple) else str(peer)
                cap = ingress.limiter.acquire(self.client)
                if cap:
                    self.refused = True
                    event(log, "refused", level=logging.WARNING, client=self.client,
                          reason=f"{cap} reached")
                    transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())
                    transport.close()
                    return
                self.counted = True
                if implicit_tls or ingress._plain_auth_allowed(peer):
                    self._auth_require_tls = False
                ingress.sessions.add(self)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.refused:
                return
            ingress.sessions.discard(self)
            if self.counted:
                self.counted = False
                ingress.limiter.release(self.client)
            super().connection_lost(exc)

        async def push(self, status: Any) -> None:
            if isinstance(status, str):
                status = REWRITES.get(status, status)
                if status.startswith("250 2.0.0"):
                    self.errors = 0
                elif status[:1] in ("4", "5") and not status.startswith(NOT_ERRORS):
                    self.errors += 1
            await super().push(status)
            if self.errors >= config.max_errors and self.transport is not None:
                event(log, "refused", level=logging.WARNING, client=self.client,
                      reason="smtp.max_errors reached")
                self.errors = 0
                await super().push(str(TOO_MANY_ERRORS))
                self.transport.close()

        @syntax("DATA")
        async def smtp_DATA(self, arg: str) -> None:
            """aiosmtpd's DATA with the upload read in blocks (relay.ingress.data)."""
            # the whole DATA phase, upload and spool commit, gets smtp.data_timeout
            self._reset_timeout(config.data_timeout)
            if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
                return
            assert self.envelope is not None
            if not self.envelope.rcpt_tos:
                await self.push("503 Error: need RCPT command")
                return
            if arg:
                await self.push("501 Syntax: DATA")
                return
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                data, state = await read_data(self._reader, self.data_size_limit,
                                              self.line_length_limit)
            except asyncio.IncompleteReadError:
                return  # the client went away mid-message: nothing was accepted
            except asyncio.CancelledError:
                self._writer.close()
                raise
            if state != NOMINAL:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)"
                                if state == TOO_LONG else "552 Error: Too much mail data")
                self._set_post_data_state()
                return
            self.envelope.content = self.envelope.original_content = data
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)

        def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
            # aiosmtpd's, less the typing.Protocol class it defines on every call
            if not arg:
                return "", ""
            addr, rest = _parse_address(arg)
            if addr is None or (self.local_part_limit
                                and len(addr.rpartition("@")[0]) > self.local_part_limit):
                return None, None
            return addr, rest

        def __dir__(self) -> list[str]:
            # aiosmtpd builds its verb and AUTH tables from dir() on each connection
            return _names(type(self), ("smtp_", "auth_"))

        def _timeout_cb(self) -> None:
            if isinstance(self.transport, asyncio.WriteTransport):
                self.transport.write(f"{TIMEOUT}\r\n".encode())
            super()._timeout_cb()

    return _SMTP
