"""SMTP ingress: an aiosmtpd server that spools each message before answering 250.

handle_DATA hands the bytes as received (but for the header changes of relay.ingress.headers
and the optional DKIM signature) to Spool.prepare (on the loop for a small message, in a
worker thread for a big one), then to the shared group commit (relay.spool.commit) that
flushes them, renames them into active/ and flushes again, all shielded from client
disconnects; it answers 250 only once they are durable; spool errors
answer 451 4.3.0 or 452 4.3.1, never 500. Mail is accepted only from smtp.allowed_networks or
authenticated clients (AUTH over TLS, relay.ingress.auth); replies live in
relay.ingress.replies, address rules in relay.ingress.addresses, caps in relay.ingress.limits.
Writes spool/incoming -> active; tells a QueuedListener (the delivery pool). Built by
relay.service.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay.config import SmtpConfig
from relay.config_lanes import LanesConfig
from relay.delivery.ports import QueuedListener
from relay.errors import SpoolError, SpoolFullError
from relay.ingress import addresses, content, headers, lanes
from relay.ingress.auth import AuthHooks
from relay.ingress.credentials import Credentials, User
from relay.ingress.headers import Split
from relay.ingress.limits import AuthThrottle, ConnectionLimiter, ConnectionRate, Networks
from relay.ingress.replies import (
    ACCESS_DENIED,
    AUTH_REQUIRED,
    BAD_ADDRESS,
    BAD_SENDER,
    NO_RCPTS,
    NO_SMTPUTF8,
    NON_ASCII_ADDRESS,
    OK,
    RCPT_OK,
    SENDER_NOT_ALLOWED,
    SHUTTING_DOWN,
    SPOOL_ERROR,
    SPOOL_FULL,
    SUPPRESSED,
    TOO_MANY_RCPTS,
    Reply,
    queued_as,
)
from relay.ingress.session import (
    RelaySession,
    SessionObserver,
    SessionRules,
    hook_names,
    write_reply,
)
from relay.ingress.template import Template
from relay.ingress.tls import server_context
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.record import Envelope, SesOptions
from relay.spool.spool import Spool

log = logging.getLogger("relay.smtp")

#: bytes of a message handed on with it for its header fields (relay.store.messages)
HEAD = 64 * 1024
#: messages smaller than this are inspected and written on the event loop (a thread
#: hand-off costs more than the work)
INLINE = 256 * 1024


def client_address(session: Session) -> str:
    """The client's IP address ("" when unknown).

    aiosmtpd types Session.peer as a str; it holds the transport's peername tuple.
    """
    peer: object = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class IngressHandler(AuthHooks):
    """aiosmtpd hooks; each returns the reply line."""

    def __init__(
        self,
        *,
        spool: Spool,
        config: SmtpConfig,
        listener: QueuedListener | None = None,
        credentials: Credentials | None = None,
        signer: Callable[[bytes], bytes] | None = None,
        commit: GroupCommit | None = None,
        rcpt_check: Callable[[str], Awaitable[bool]] | None = None,
        lanes: LanesConfig | None = None,
    ) -> None:
        self.spool = spool
        #: the lane rules and their SES defaults (relay.ingress.lanes)
        self.lanes = lanes or LanesConfig()
        #: flushes shared with the other sessions (and the delivery pool, when given its)
        self.commit = commit or GroupCommit(spool)
        self.config = config
        #: told of each message once it is durable in active/
        self.listener = listener
        self.credentials = credentials
        #: optional RCPT-time check (smtp.reject_suppressed): True answers 550 5.1.1
        self.rcpt_check = rcpt_check
        self.signer = signer
        self.hostname = config.hostname or socket.getfqdn()
        self.throttle = AuthThrottle(delay=config.auth_failure_delay,
                                     max_failures=config.auth_max_failures,
                                     lockout=config.auth_lockout)
        self.networks = Networks(config.allowed_networks)
        self.closing = False
        self.accepted = 0
        #: sessions inside handle_DATA: never cut off during a commit
        self.busy: set[int] = set()

    def __dir__(self) -> Iterable[str]:
        # aiosmtpd looks its hooks up with dir()/inspect.getmembers() on every connection
        return hook_names(type(self), ("handle_", "auth_"))

    def allowed(self, session: Session) -> bool:
        return session.peer in self.networks

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
        options: list[str],
    ) -> str:
        if self.closing:
            return str(SHUTTING_DOWN)
        if not self.permitted(session):
            event(log, "refused", level=logging.WARNING, client=client_address(session),
                  reason="client not in smtp.allowed_networks",
                  fix="admit its network in smtp.allowed_networks "
                      "(RELAY_SMTP__ALLOWED_NETWORKS) or have it authenticate (smtp.auth_file)")
            return str(self.denied())
        if envelope.smtp_utf8:
            return str(NO_SMTPUTF8)
        try:
            if address != "<>":  # the null reverse-path (bounces, DSNs) has no domain
                address = addresses.sender(
                    address, allowed_domains=self.config.allowed_sender_domains)
        except addresses.AddressError as exc:
            return str(self._address_reply(exc, sender=True))
        # aiosmtpd types auth_data as None; it holds what auth_PLAIN/auth_LOGIN returned
        user: object = session.auth_data if session.authenticated else None
        if isinstance(user, User) and not user.may_send_as(address):
            event(log, "refused", level=logging.WARNING, client=client_address(session),
                  reason="sender not allowed for this user", sender=address)
            return str(SENDER_NOT_ALLOWED)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
        options: list[str],
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
        return str(RCPT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if not envelope.rcpt_tos:
            return str(NO_RCPTS)
        data = envelope.original_content
        if data is None:
            data = envelope.content if isinstance(envelope.content, bytes) else b""
        data, parts, refusal = await self.inspect(session, data)
        if refusal is not None:
            event(log, "refused", level=logging.WARNING, client=client_address(session),
                  reason=refusal.text)
            return str(refusal)
        try:
            lane, ses = self.lane_of(server, session, envelope, data, parts)
        except lanes.BadSesHeader as exc:
            event(log, "refused", level=logging.WARNING, client=client_address(session),
                  reason=str(exc))
            return str(lanes.BAD_SES_HEADER.with_detail(str(exc)))
        prepare = self.preparer(server, session, (data, parts))
        env = Envelope(
            # the null reverse-path (bounces, DSNs) arrives as "<>" from aiosmtpd's parser
            sender="" if envelope.mail_from in (None, "", "<>") else envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            received_at=time.time(),
            client=client_address(session),
            helo=session.host_name or "",
            lane=lane,
            ses=ses,
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
              lane=env.lane, sender=env.sender, recipients=list(env.recipients))
        return str(queued_as(qid))

    def lane_of(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                data: bytes, parts: Split | None = None) -> tuple[str, SesOptions]:
        """The message's lane and SendEmail options (BadSesHeader: refuse it)."""
        sock = server.transport.get_extra_info("sockname") if server.transport else None
        user: object = session.auth_data if session.authenticated else None
        facts = lanes.Facts(
            port=int(sock[1]) if isinstance(sock, tuple) and len(sock) > 1 else 0,
            user=user.name if isinstance(user, User) else "",
            client=client_address(session), sender=envelope.mail_from or "",
            headers=lanes.header_fields(data, parts))
        lane = lanes.decide(self.lanes, facts)
        return lane, lanes.ses_options(self.lanes, lane, facts)

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
        return (BAD_SENDER if sender else BAD_ADDRESS).with_detail(exc.reason)

    async def inspect(self, session: Session,
                      data: bytes) -> tuple[bytes, Split | None, Reply | None]:
        """Line endings, long lines and the header From (relay.ingress.content.check)."""
        user: object = session.auth_data if session.authenticated else None
        check = functools.partial(
            content.check, data, allowed_domains=self.config.allowed_sender_domains,
            user=user if isinstance(user, User) else None)
        # a big message is scanned off the loop, so other sessions are not held up
        return check() if len(data) < INLINE else await asyncio.to_thread(check)

    def preparer(self, server: SMTP, session: Session,
                 known: tuple[bytes, Split | None] = (b"", None)) -> Callable[[bytes], bytes]:
        """Bcc out, Date/Message-ID in, Received first, then the DKIM signature.

        Runs in the worker thread with the spool write, inside the shielded commit.
        `known` is a message and its header split, not to be split again.
        """
        tls = server.transport is not None and server.transport.get_extra_info("ssl_object")
        # RFC 3848 protocol names: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
        protocol = ("ESMTP" if session.extended_smtp else "SMTP") + ("S" if tls else "") + (
            "A" if session.authenticated else "")
        now = time.time()
        received = headers.received_line(
            helo=session.host_name or "", client=client_address(session),
            hostname=self.hostname, protocol=protocol, now=now)

        def prepare(data: bytes) -> bytes:
            # the X-SES-* parameter headers travel as SendEmail parameters, not in the bytes
            parts = known[1] if data is known[0] else None
            stripped = lanes.strip(data, parts)
            data = headers.prepare(stripped, received=received, hostname=self.hostname,
                                   now=now, parts=parts if stripped is data else None)
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
        def write(inline: bool = False) -> tuple[str, bytes]:
            body = prepare(data)
            return self.spool.prepare(env, body, inline=inline), body[:HEAD]

        # A small message is written on the loop: the write lands in the page cache (the
        # group commit's flush is what waits for the disk), and the hand-off to a thread
        # and back costs more than the write. A big one goes to a thread, so that other
        # sessions are not held up while it is copied; so does every one while too many
        # files wait for a flush (the spool is crowded: each then syncs itself, in the
        # thread, never on the loop).
        since = self.spool.since()
        if len(data) < INLINE and not self.spool.crowded():
            qid, head = write(inline=True)
        else:
            qid, head = await asyncio.get_running_loop().run_in_executor(None, write)
        await self.commit.publish(qid, since=since)
        if self.listener is not None:
            # the envelope and the header block, so nobody reads them back from the spool
            self.listener.queued(qid, env, head)
        return qid


class Ingress:
    """The listening SMTP server (and the implicit-TLS one when smtp.implicit_tls)."""

    def __init__(self, handler: IngressHandler, config: SmtpConfig, *,
                 observer: SessionObserver | None = None, reuse_port: bool = False) -> None:
        self.handler = handler
        self.config = config
        self.server: asyncio.Server | None = None
        self.tls_server: asyncio.Server | None = None
        self.tls_address: tuple[str, int] | None = None
        self.sessions: set[RelaySession] = set()
        #: several worker processes listen on one port; the kernel spreads connections
        self.reuse_port = reuse_port
        self.tls_context = server_context(config)
        self.limiter = ConnectionLimiter(total=config.max_connections,
                                         per_client=config.max_connections_per_client)
        rules = SessionRules(config=config, limiter=self.limiter,
                             plain_auth=Networks(config.allow_plain_auth_from),
                             sessions=self.sessions, observer=observer,
                             rate=ConnectionRate(config.connection_rate_limit),
                             trusted=Networks(config.allowed_networks))
        #: the protocol factories of the two listeners
        self._plain = functools.partial(self._session, rules)
        self._tls = functools.partial(self._session, replace(rules, implicit_tls=True))
        #: aiosmtpd's session set-up of each listener (by implicit_tls), made at its first
        #: connection, on the running loop
        self._templates: dict[bool, Template] = {}

    def _session(self, rules: SessionRules) -> RelaySession:
        """One connection's protocol, under its listener's rules."""
        template = self._templates.get(rules.implicit_tls)
        if template is None:
            template = self._templates[rules.implicit_tls] = self._template(rules)
        return RelaySession(self.handler, rules=rules, template=template)

    def session_options(self, *, implicit_tls: bool) -> dict[str, Any]:
        """aiosmtpd's SMTP options for the sessions of one listener."""
        exclude = None if self.handler.credentials is not None else ["PLAIN", "LOGIN"]
        return dict(
            # the running loop, handed over: aiosmtpd would look it up for every connection
            loop=asyncio.get_running_loop(),
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

    def _template(self, rules: SessionRules) -> Template:
        """aiosmtpd's set-up of a listener's sessions, made once (relay.ingress.template)."""
        template = Template(RelaySession, self.handler,
                            self.session_options(implicit_tls=rules.implicit_tls))
        if not template.fast:
            event(log, "session_setup_per_connection", level=logging.WARNING,
                  reason=f"aiosmtpd's session set-up cannot be shared: {template.unsafe}")
        return template

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._plain, host=self.config.host, port=self.config.port, reuse_address=True,
            reuse_port=self.reuse_port or None
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        if self.config.implicit_tls and self.tls_context is not None:
            self.tls_server = await loop.create_server(
                self._tls, host=self.config.host,
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
                write_reply(proto.transport, SHUTTING_DOWN)
                proto.transport.close()
                self.sessions.discard(proto)
            await asyncio.sleep(0.05)
