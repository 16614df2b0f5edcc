"""SMTP ingress: an aiosmtpd server that spools each message before answering 250.

handle_DATA hands the bytes as received (but for the header changes of relay.ingress.headers and
the optional DKIM signature) to Spool.prepare in a worker thread, then to the shared group
commit (relay.spool.commit) that flushes them, renames them into active/ and flushes again, all
shielded from client disconnects; it answers 250 only once they are durable; spool
errors answer 451 4.3.0 or 452 4.3.1, never 500. Mail is accepted only from
smtp.allowed_networks or authenticated clients (AUTH over TLS, relay.ingress.credentials); address rules
live in relay.ingress.addresses, header changes in relay.ingress.headers, caps in relay.ingress.limits.
Writes spool/incoming -> active; tells the delivery pool. Built by relay.service.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay.config import SmtpConfig
from relay.errors import SpoolError, SpoolFullError
from relay.ingress import addresses, headers
from relay.ingress.auth import AuthHooks
from relay.ingress.credentials import Credentials, User
from relay.ingress.limits import AuthThrottle, ConnectionLimiter
from relay.ingress.tls import server_context
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.spool import Envelope, Spool

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
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII addresses not supported (no SMTPUTF8)")
BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed on this relay")
NO_SMTPUTF8 = Reply(555, "5.6.7", "SMTPUTF8 not supported")
TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

#: aiosmtpd's own reply lines, given enhanced status codes
REWRITES = {
    "552 Error: Too much mail data": str(TOO_BIG),
    "552 Error: message size exceeds fixed maximum message size": str(TOO_BIG),
    "530 Must issue a STARTTLS command first": str(STARTTLS_FIRST),
}
#: replies that do not count against smtp.max_errors
NOT_ERRORS = ("421", "452 4.5.3")
SUPPRESSED = Reply(550, "5.1.1", "Recipient address is on the suppression list")


@functools.cache
def _names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """A class's attribute names with these prefixes: what aiosmtpd's dir() scans need.

    aiosmtpd calls dir() and getattr() on every name of the session and of the handler for
    each connection (about 0.2 ms); listing only the names it looks for, once per class,
    gives it the same tables.
    """
    return sorted({n for c in cls.__mro__ for n in vars(c) if n.startswith(prefixes)})


#: bytes of a message handed on with it for its header fields (relay.store.messages)
HEAD = 64 * 1024


class IngressHandler(AuthHooks):
    """aiosmtpd hooks; each returns the reply line."""

    #: optional RCPT-time check (smtp.reject_suppressed): True answers 550 5.1.1
    rcpt_check: Callable[[str], Awaitable[bool]] | None = None

    def __init__(
        self,
        *,
        spool: Spool,
        config: SmtpConfig,
        on_queued: Callable[..., None] | None = None,
        credentials: Credentials | None = None,
        signer: Callable[[bytes], bytes] | None = None,
        commit: GroupCommit | None = None,
    ) -> None:
        self.spool = spool
        #: flushes shared with the other sessions (and the delivery pool, when given its)
        self.commit = commit or GroupCommit(spool)
        self.config = config
        self.on_queued = on_queued
        self.credentials = credentials
        self.signer = signer
        self.hostname = config.hostname or socket.getfqdn()
        self.throttle = AuthThrottle(delay=config.auth_failure_delay,
                                     max_failures=config.auth_max_failures,
                                     lockout=config.auth_lockout)
        self.networks = [ipaddress.ip_network(n, strict=False) for n in config.allowed_networks]
        self.closing = False
        self.accepted = 0
        #: sessions inside handle_DATA: never cut off during a commit
        self.busy: set[int] = set()

    def __dir__(self) -> list[str]:
        # aiosmtpd looks its hooks up with dir()/inspect.getmembers() on every connection
        return _names(type(self), ("handle_", "auth_"))

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
        if not self.permitted(session):
            event(log, "refused", level=logging.WARNING, client=session.peer[0] if session.peer else "",
                  reason="client not in smtp.allowed_networks")
            return str(self.denied())
        if envelope.smtp_utf8:
            return str(NO_SMTPUTF8)
        try:
            if address != "<>":  # the null reverse-path (bounces, DSNs) has no domain
                address = addresses.sender(
                    address, allowed_domains=self.config.allowed_sender_domains)
        except addresses.AddressError as exc:
            return str(self._address_reply(exc, sender=True))
        user = session.auth_data if session.authenticated else None
        if isinstance(user, User) and not user.may_send_as(address):
            event(log, "refused", level=logging.WARNING, client=session.peer[0],
                  reason="sender not allowed for this user", sender=address)
            return str(SENDER_NOT_ALLOWED)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if self.closing:
            return str(SHUTTING_DOWN)
        if not self.permitted(session):
            return str(self.denied())
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return str(TOO_MANY_RCPTS)
        try:
            address = addresses.recipient(address)
        except addresses.AddressError as exc:
            return str(self._address_reply(exc, sender=False))
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
        prepare = self.preparer(server, session)
        env = Envelope(
            # the null reverse-path (bounces, DSNs) arrives as "<>" from aiosmtpd's parser
            sender="" if envelope.mail_from in (None, "", "<>") else envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            received_at=time.time(),
            client=session.peer[0] if session.peer else "",
            helo=session.host_name or "",
        )
        self.busy.add(id(session))
        # The commit runs to the end even if the client hangs up after the final dot;
        # the delivery pool hears about it whether or not this coroutine survives.
        commit = asyncio.ensure_future(self._spool(env, data, prepare))
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

    # --- hardening: access, addresses, headers, AUTH -------------------------------

    def permitted(self, session: Session) -> bool:
        return bool(session.authenticated) or self.allowed(session)

    def denied(self) -> Reply:
        """530 when AUTH could help the client, else 554."""
        return AUTH_REQUIRED if self.credentials is not None else ACCESS_DENIED

    @staticmethod
    def _address_reply(exc: addresses.AddressError, *, sender: bool) -> Reply:
        if exc.kind == addresses.NON_ASCII:
            return NON_ASCII_ADDRESS
        if exc.kind == addresses.DOMAIN:
            return SENDER_NOT_ALLOWED
        base = BAD_SENDER if sender else BAD_ADDRESS
        return Reply(base.code, base.status, f"{base.text}: {exc.reason}"[:200])

    def preparer(self, server: SMTP, session: Session) -> Callable[[bytes], bytes]:
        """Bcc out, Date/Message-ID in, Received first, then the DKIM signature.

        Runs in the worker thread with the spool write, inside the shielded commit.
        """
        tls = server.transport is not None and server.transport.get_extra_info("ssl_object")
        # RFC 3848 protocol names: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
        protocol = ("ESMTP" if session.extended_smtp else "SMTP") + ("S" if tls else "") + (
            "A" if session.authenticated else "")
        now = time.time()
        received = headers.received_line(
            helo=session.host_name or "", client=session.peer[0] if session.peer else "",
            hostname=self.hostname, protocol=protocol, now=now)

        def prepare(data: bytes) -> bytes:
            data = headers.prepare(data, received=received, hostname=self.hostname, now=now)
            return self.signer(data) if self.signer is not None else data

        return prepare

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd parses UTF-8 arguments (so non-ASCII addresses get 553 5.6.7, not 500)
        # but SES cannot deliver SMTPUTF8 mail: never advertise it
        out = [r for r in responses if r[4:].upper() != "SMTPUTF8"]
        if self.credentials is None:
            out = [r for r in out if not r[4:].upper().startswith("AUTH")]
        out[:-1] = [r[:3] + "-" + r[4:] for r in out[:-1]]
        out[-1] = out[-1][:3] + " " + out[-1][4:]
        return out

    async def _spool(self, env: Envelope, data: bytes,
                     prepare: Callable[[bytes], bytes]) -> str:
        """Write the message, then wait for the shared flushes that make it durable."""
        loop = asyncio.get_running_loop()

        def write() -> tuple[str, bytes]:
            body = prepare(data)
            return self.spool.prepare(env, body), body[:HEAD]

        qid, head = await loop.run_in_executor(None, write)
        await self.commit.publish(qid)
        if self.on_queued is not None:
            # the envelope and the header block, so nobody reads them back from the spool
            self.on_queued(qid, env, head)
        return qid


class Ingress:
    """The listening SMTP server (and the implicit-TLS one when smtp.implicit_tls)."""

    def __init__(self, handler: IngressHandler, config: SmtpConfig) -> None:
        self.handler = handler
        self.config = config
        self.server: asyncio.base_events.Server | None = None
        self.tls_server: asyncio.base_events.Server | None = None
        self.tls_address: tuple[str, int] | None = None
        self.sessions: set[SMTP] = set()
        #: several worker processes listen on one port; the kernel spreads connections
        self.reuse_port = False
        self._classes: dict[bool, type[SMTP]] = {}
        self.tls_context = server_context(config)
        self.limiter = ConnectionLimiter(total=config.max_connections,
                                         per_client=config.max_connections_per_client)
        self.plain_auth_networks = [ipaddress.ip_network(n, strict=False)
                                    for n in config.allow_plain_auth_from]

    def _plain_auth_allowed(self, peer: Any) -> bool:
        try:
            addr = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.plain_auth_networks)

    def _protocol(self, implicit_tls: bool = False) -> SMTP:
        cls = self._classes.get(implicit_tls)
        if cls is None:
            from relay.ingress.session import session_class  # it needs this module's replies

            cls = self._classes[implicit_tls] = session_class(self, implicit_tls)
        exclude = None if self.handler.credentials is not None else ["PLAIN", "LOGIN"]
        return cls(
            self.handler,
            data_size_limit=self.config.max_message_size,
            # parsed as UTF-8 so non-ASCII addresses get 553 5.6.7; never advertised
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.handler.hostname,
            ident="relay ESMTP",
            timeout=self.config.timeout,
            tls_context=None if implicit_tls else self.tls_context,
            require_starttls=self.config.require_tls and not implicit_tls,
            auth_require_tls=True,
            auth_exclude_mechanism=exclude,
        )

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol, host=self.config.host, port=self.config.port, reuse_address=True,
            reuse_port=self.reuse_port or None
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        if self.config.implicit_tls and self.tls_context is not None:
            self.tls_server = await loop.create_server(
                lambda: self._protocol(implicit_tls=True), host=self.config.host,
                port=self.config.tls_port, reuse_address=True, ssl=self.tls_context,
                reuse_port=self.reuse_port or None,
            )
            self.tls_address = self.tls_server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; sessions get 421 at their next command, then are closed."""
        self.handler.closing = True
        if self.server is not None:
            self.server.close()
        if self.tls_server is not None:
            self.tls_server.close()
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            for proto in list(self.sessions):
                if proto.transport is not None and proto.transport.is_closing():
                    self.sessions.discard(proto)  # on its way out (e.g. TLS shutdown)
                    continue
                if proto.transport is None or id(proto.session) in self.handler.busy:
                    continue
                proto.transport.write(f"{SHUTTING_DOWN}\r\n".encode())
                proto.transport.close()
                self.sessions.discard(proto)
            await asyncio.sleep(0.05)
