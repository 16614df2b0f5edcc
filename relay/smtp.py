"""SMTP ingress: an aiosmtpd server that spools each message before answering 250.

handle_DATA hands the bytes exactly as received to Spool.accept in a worker thread,
shielded from client disconnects, and answers 250 only once they are durable; spool
errors answer 451 4.3.0 or 452 4.3.1, never 500. Mail is accepted only from
smtp.allowed_networks. Writes spool/incoming -> active; tells the delivery pool.
Built by relay.service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session

from relay.config import SmtpConfig
from relay.errors import SpoolError, SpoolFullError
from relay.log import event
from relay.spool import Envelope, Spool

log = logging.getLogger("relay.smtp")


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, enhanced status and text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


ACCESS_DENIED = Reply(554, "5.7.1", "Access denied: relaying not permitted from your address")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad recipient address syntax")
NO_RCPTS = Reply(503, "5.5.1", "Error: need RCPT command")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
OK = Reply(250, "2.1.0", "Ok")
SUPPRESSED = Reply(550, "5.1.1", "Recipient address is on the suppression list")


class IngressHandler:
    """aiosmtpd hooks; each returns the reply line."""

    #: optional RCPT-time check (smtp.reject_suppressed): True answers 550 5.1.1
    rcpt_check: Callable[[str], Awaitable[bool]] | None = None

    def __init__(
        self,
        *,
        spool: Spool,
        config: SmtpConfig,
        on_queued: Callable[[str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self.on_queued = on_queued
        self.networks = [ipaddress.ip_network(n, strict=False) for n in config.allowed_networks]
        self.closing = False
        self.accepted = 0
        #: sessions inside handle_DATA: never cut off during a commit
        self.busy: set[int] = set()

    def allowed(self, session: Session) -> bool:
        peer = session.peer
        if not peer or isinstance(peer, str):
            return False
        try:
            addr = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if self.closing:
            return str(SHUTTING_DOWN)
        if not self.allowed(session):
            event(log, "refused", level=logging.WARNING, client=session.peer[0] if session.peer else "",
                  reason="client not in smtp.allowed_networks")
            return str(ACCESS_DENIED)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if self.closing:
            return str(SHUTTING_DOWN)
        if not self.allowed(session):
            return str(ACCESS_DENIED)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return str(TOO_MANY_RCPTS)
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return str(BAD_ADDRESS)
        if self.rcpt_check is not None and await self.rcpt_check(address):
            return str(SUPPRESSED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(Reply(250, "2.1.5", "Ok"))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if not envelope.rcpt_tos:
            return str(NO_RCPTS)
        data = envelope.original_content
        if data is None:
            data = envelope.content if isinstance(envelope.content, bytes) else b""
        env = Envelope(
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            received_at=time.time(),
            client=session.peer[0] if session.peer else "",
            helo=session.host_name or "",
        )
        loop = asyncio.get_running_loop()
        self.busy.add(id(session))
        commit = loop.run_in_executor(None, self.spool.accept, env, data)
        # The commit runs to the end even if the client hangs up after the final dot;
        # the delivery pool hears about it whether or not this coroutine survives.
        commit.add_done_callback(self._committed)
        try:
            qid = await asyncio.shield(commit)
        except SpoolFullError as exc:
            event(log, "spool_full", level=logging.ERROR, error=str(exc))
            return str(SPOOL_FULL)
        except SpoolError as exc:
            event(log, "spool_error", level=logging.ERROR, error=str(exc))
            return str(SPOOL_ERROR)
        except Exception as exc:  # noqa: BLE001 - never let aiosmtpd turn this into a 500
            log.exception("unexpected error while spooling")
            event(log, "spool_error", level=logging.ERROR, error=repr(exc))
            return str(SPOOL_ERROR)
        finally:
            self.busy.discard(id(session))
        self.accepted += 1
        event(log, "accepted", queue_id=qid, client=env.client, size=len(data),
              sender=env.sender, recipients=list(env.recipients))
        return f"250 2.0.0 Ok: queued as {qid}"

    def _committed(self, fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        if self.on_queued is not None:
            self.on_queued(fut.result())


class Ingress:
    """The listening SMTP server."""

    def __init__(self, handler: IngressHandler, config: SmtpConfig) -> None:
        self.handler = handler
        self.config = config
        self.server: asyncio.base_events.Server | None = None
        self.sessions: set[SMTP] = set()

    def _protocol(self) -> SMTP:
        ingress = self

        class _SMTP(SMTP):
            def connection_made(self, transport: Any) -> None:
                ingress.sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                ingress.sessions.discard(self)
                super().connection_lost(exc)

        return _SMTP(
            self.handler,
            data_size_limit=self.config.max_message_size,
            enable_SMTPUTF8=False,
            decode_data=False,
            hostname=self.config.hostname or socket.getfqdn(),
            ident="relay ESMTP",
            timeout=self.config.timeout,
        )

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol, host=self.config.host, port=self.config.port, reuse_address=True
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; sessions get 421 at their next command, then are closed."""
        self.handler.closing = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            for proto in list(self.sessions):
                if proto.transport is None or id(proto.session) in self.handler.busy:
                    continue
                proto.transport.write(f"{SHUTTING_DOWN}\r\n".encode())
                proto.transport.close()
                self.sessions.discard(proto)
            await asyncio.sleep(0.05)
