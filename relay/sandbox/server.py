"""The SES sandbox: an SES-compatible HTTP endpoint on loopback for local runs and tests.

It answers SESv2 SendEmail and GetAccount as SES does (same paths, JSON and error
headers, so the real aioboto3 client talks to it unchanged), writes every accepted
message as an .eml file a person can open, enforces the account's per-second rate and
24-hour quota (429 when exceeded), and plays scripted faults and latency for tests.
Mailbox-simulator recipients produce SES notifications on an SQS-compatible queue
(relay.sandbox.simulator); ListSuppressedDestinations answers from account_suppressed.
Started by relay.service when ses.endpoint_url = "sandbox", or by tests in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import functools
import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.sandbox.signing import CERT_PATH, signing_key
from relay.sandbox.simulator import SqsQueue, notifications, sns_envelope, suppressed_page

#: SES: message tag names and values
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")

#: Faults a test can script, with the HTTP status and SES error code each answers.
FAULTS: dict[str, tuple[int, str, str]] = {
    "throttle": (429, "TooManyRequestsException", "Maximum sending rate exceeded."),
    "5xx": (500, "InternalFailure", "An internal error occurred."),
    "unavailable": (503, "ServiceUnavailable", "Service unavailable."),
    "paused": (400, "SendingPausedException", "Sending is paused for this account."),
    "suspended": (400, "AccountSuspendedException", "The account is suspended."),
    "rejected": (400, "MessageRejected", "Email address is not verified."),
    "mailfrom": (400, "MailFromDomainNotVerifiedException", "MAIL FROM domain not verified."),
    "noconfigset": (404, "NotFoundException", "Configuration set does not exist."),
    "badrequest": (400, "BadRequestException", "Bad request."),
}


@dataclass
class Call:
    #: when the call counts against the rate: the relay's departure stamp when it sent
    #: one (X-Relay-Departed), else the arrival time
    at: float
    sender: str
    recipients: list[str]
    message_id: str = ""
    error: str = ""
    raw: bytes = b""
    configuration_set: str = ""
    arrived: float = 0.0
    #: EmailTags as (name, value), TenantName, ListManagementOptions as sent
    tags: list[tuple[str, str]] = field(default_factory=list)
    tenant: str = ""
    list_management: dict[str, str] = field(default_factory=dict)


#: seconds a held SendEmail answer waits at most for SandboxState.answers
HOLD_LIMIT = 60.0


def _set(flag: threading.Event) -> threading.Event:
    flag.set()
    return flag


@dataclass
class SandboxState:
    """Everything the sandbox knows; tests read and change it between calls."""

    outbox: Path | None = None
    max_send_rate: float = 14.0
    max_24hour_send: float = 50000.0
    sent_last_24hours: float = 0.0
    sending_enabled: bool = True
    latency: float = 0.0
    keep_raw: bool = True
    #: faults answered to the next SendEmail calls, in order ("ok" passes one call
    #: through, "slow" answers it normally after slow_seconds, "timeout" sleeps 60 s)
    faults: deque[str] = field(default_factory=deque)
    slow_seconds: float = 3.0
    #: cleared, SendEmail calls wait (at most HOLD_LIMIT seconds) until it is set again: a
    #: test holds the answer while it acts on the message in flight
    answers: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    #: SendEmail calls being handled right now
    inflight: int = 0
    #: GetAccount calls answered
    account_reads: int = 0
    calls: list[Call] = field(default_factory=list)
    throttles: int = 0
    quota_exceeded: int = 0
    #: SNS-wrapped SES notifications for mailbox-simulator recipients, served as SQS
    feedback: SqsQueue = field(default_factory=SqsQueue)
    #: put the SES JSON itself on the queue, as SNS raw message delivery does (the relay
    #: then needs feedback.raw_delivery = true); else a signed SNS envelope
    raw_delivery: bool = False
    #: SES's account-level suppression list: address -> BOUNCE or COMPLAINT
    account_suppressed: dict[str, str] = field(default_factory=dict)
    _window: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.message_id]

    def recipients_sent(self) -> int:
        return sum(len(c.recipients) for c in self.accepted())

    def max_window(self, width: float = 1.0, *, by_arrival: bool = False) -> int:
        """The most recipients accepted in any window of `width` seconds (by the time
        each call counts against the rate, or by arrival)."""
        times: list[tuple[float, int]] = sorted(
            (c.arrived if by_arrival else c.at, len(c.recipients)) for c in self.accepted()
        )
        best = total = lo = 0
        for hi in range(len(times)):
            total += times[hi][1]
            while times[hi][0] - times[lo][0] >= width:
                total -= times[lo][1]
                lo += 1
            best = max(best, total)
        return best

    def script(self, *faults: str) -> None:
        for f in faults:
            if f not in FAULTS and f not in ("ok", "slow", "timeout"):
                known = ", ".join([*FAULTS, "ok", "slow", "timeout"])
                raise ValueError(f"unknown fault {f!r}; known: {known}")
        with self.lock:
            self.faults.extend(faults)

    def _admit(self, n: int, at: float) -> tuple[int, str, str] | None:
        """Rate and quota check for n recipients counted at `at`; the error, or None.

        Calls may count slightly out of order (departure stamps), so every one-second
        window that would hold `at` is checked, not only the one ending there.
        """
        with self.lock:
            window = self._window
            while window and window[0][0] < at - 10.0:
                window.pop(0)
            near = [(t, k) for t, k in window if at - 1.0 < t < at + 1.0]
            near.append((at, n))
            near.sort()
            total = lo = 0
            for hi in range(len(near)):
                total += near[hi][1]
                while near[hi][0] - near[lo][0] >= 1.0:
                    total -= near[lo][1]
                    lo += 1
                if total > self.max_send_rate:
                    self.throttles += 1
                    return FAULTS["throttle"]
            if 0 <= self.max_24hour_send < self.sent_last_24hours + n:
                self.quota_exceeded += 1
                return (400, "ThrottlingException", "Daily message quota exceeded.")
            bisect.insort(window, (at, n))
            self.sent_last_24hours += n
            return None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message}, status=status, headers={"x-amzn-ErrorType": f"{code}:"}
    )


def _recipients(body: dict[str, Any]) -> list[str]:
    dest = body.get("Destination", {})
    return [
        *dest.get("ToAddresses", []),
        *dest.get("CcAddresses", []),
        *dest.get("BccAddresses", []),
    ]


def counted_at(stamp: str | None, arrived: float) -> float:
    """When a call counts against the rate: the sender's departure stamp, else arrival.

    Scheduling delays on a shared test machine are not the sender's doing; a wild stamp
    (unparsable, in the future, or over 5 s old) falls back on arrival.
    """
    if not stamp:
        return arrived
    try:
        departed = float(stamp)
    except ValueError:
        departed = 0.0
    return departed if arrived - 5.0 <= departed <= arrived else arrived


def _message_id() -> str:
    return f"{int(time.time() * 1000):016x}-{uuid.uuid4()}-000000"


class Sandbox:
    """The aiohttp application around a SandboxState."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.app = web.Application(client_max_size=48 * 1024 * 1024)
        self.app.router.add_post("/v2/email/outbound-emails", self.send_email)
        self.app.router.add_get("/v2/email/account", self.get_account)
        self.app.router.add_post("/", self.state.feedback.handle)
        self.app.router.add_get("/v2/email/suppression/addresses", self.list_suppressed)
        self.app.router.add_get(CERT_PATH, self.certificate)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        await asyncio.to_thread(signing_key)  # made once per process, before mail arrives
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        self.state.feedback.closing = True
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def send_email(self, request: web.Request) -> web.Response:
        st = self.state
        arrived = time.time()  # SES counts a call against the rate when it arrives
        with st.lock:
            st.inflight += 1
        try:
            return await self._send_email(request, arrived)
        finally:
            with st.lock:
                st.inflight -= 1

    async def _send_email(self, request: web.Request, arrived: float) -> web.Response:
        st = self.state
        if st.latency:
            await asyncio.sleep(st.latency)
        deadline = time.monotonic() + HOLD_LIMIT
        while not st.answers.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            body = await request.json()
            data = base64.b64decode(body["Content"]["Raw"]["Data"], validate=True)
            tags = [(str(t["Name"]), str(t["Value"])) for t in body.get("EmailTags", [])]
        except (ValueError, KeyError, TypeError, binascii.Error):
            return _error(400, "BadRequestException", "Content.Raw.Data is required")
        if any(not _TAG.fullmatch(x) for t in tags for x in t):
            return _error(400, "BadRequestException", "Invalid message tag.")
        call = Call(
            at=counted_at(request.headers.get("X-Relay-Departed"), arrived),
            arrived=arrived,
            sender=body.get("FromEmailAddress", ""),
            recipients=_recipients(body),
            configuration_set=body.get("ConfigurationSetName", ""),
            tags=tags,
            tenant=body.get("TenantName", ""),
            list_management=dict(body.get("ListManagementOptions", {})),
        )
        error = self.refusal(await self._play_fault(), call)
        if error is not None:
            call.error = error[1]
            with st.lock:
                st.calls.append(call)
            return _error(*error)
        await self._accept(call, data)
        return web.json_response({"MessageId": call.message_id})

    async def _play_fault(self) -> str | None:
        """Take the next scripted fault; the ones that delay the answer wait here."""
        st = self.state
        with st.lock:
            fault = st.faults.popleft() if st.faults else None
        if fault == "timeout":
            await asyncio.sleep(60)
        elif fault == "slow":
            await asyncio.sleep(st.slow_seconds)
        return fault

    def refusal(self, fault: str | None, call: Call) -> tuple[int, str, str] | None:
        """The error SES would answer this call with, or None; only an otherwise valid
        call is counted against the rate and quota."""
        error = FAULTS.get(fault or "")
        if error is not None:
            return error
        if not call.recipients:
            return (400, "BadRequestException", "Destination is required")
        if len(call.recipients) > 50:
            return (400, "MessageRejected", "Recipient count exceeds 50.")
        if not self.state.sending_enabled:
            return FAULTS["paused"]
        return self.state._admit(len(call.recipients), call.at)

    async def _accept(self, call: Call, data: bytes) -> None:
        """Record an accepted call, write its message to the outbox, queue its feedback."""
        st = self.state
        call.message_id = _message_id()
        if st.keep_raw:
            call.raw = data
        if st.outbox is not None:
            await asyncio.to_thread(self._write, call.message_id, data)
        with st.lock:
            st.calls.append(call)
        key, cert_url = signing_key(), self.url + CERT_PATH
        for doc in notifications(message_id=call.message_id, sender=call.sender,
                                 recipients=call.recipients, raw=data):
            st.feedback.send(json.dumps(doc) if st.raw_delivery else sns_envelope(
                doc, sign=functools.partial(key.sign, cert_url=cert_url)))

    async def certificate(self, _: web.Request) -> web.Response:
        """The SNS signing certificate the envelopes name (self-signed: the sandbox's)."""
        return web.Response(body=signing_key().pem, content_type="application/x-pem-file")

    def _write(self, message_id: str, data: bytes) -> None:
        assert self.state.outbox is not None
        self.state.outbox.mkdir(parents=True, exist_ok=True)
        tmp = self.state.outbox / f".{message_id}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.state.outbox / f"{message_id}.eml")

    async def list_suppressed(self, request: web.Request) -> web.Response:
        size = max(1, min(int(request.query.get("PageSize", "100") or 100), 1000))
        with self.state.lock:
            listed = dict(self.state.account_suppressed)
        return web.json_response(suppressed_page(listed, page_size=size,
                                                 token=request.query.get("NextToken", "")))

    async def get_account(self, request: web.Request) -> web.Response:
        st = self.state
        with st.lock:
            st.account_reads += 1
        doc: dict[str, Any] = {
            "DedicatedIpAutoWarmupEnabled": False,
            "EnforcementStatus": "HEALTHY",
            "ProductionAccessEnabled": True,
            "SendingEnabled": st.sending_enabled,
            "SendQuota": {
                "Max24HourSend": st.max_24hour_send,
                "MaxSendRate": st.max_send_rate,
                "SentLast24Hours": st.sent_last_24hours,
            },
        }
        return web.Response(text=json.dumps(doc), content_type="application/json")


class SandboxThread:
    """A sandbox on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, state: SandboxState | None = None, *, port: int = 0) -> None:
        self.state = state or SandboxState()
        self.requested_port = port
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._sandbox = Sandbox(self.state)

    def start(self) -> SandboxThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            self._sandbox.start(port=self.requested_port), self._loop
        )
        self.url = fut.result(timeout=10)
        return self

    @property
    def port(self) -> int:
        return self._sandbox.port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._sandbox.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
