"""The SNS HTTPS endpoint (/sns on the admin listener) for push subscriptions.

Checks before any fetch: the topic is one of feedback.topic_arns, SignatureVersion is 1
(SHA1) or 2 (SHA256), and SigningCertURL is https://sns.<region of the TopicArn>.amazonaws.com
(or .amazonaws.com.cn)/SimpleNotificationService-<hex>.pem with no userinfo, port, query or
fragment. Then fetches the certificate (cached), verifies the signature with `cryptography`,
applies notifications through relay.feedback.applier (which writes the tables) and confirms
subscriptions for accepted topics. Anything else answers 403 and changes nothing; a body
that is not JSON (or nested too deep) answers 400. The Verifier is the one check of an
SNS envelope, here and on the SQS path (relay.feedback.sqs). Built by relay.service.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.feedback.applier import AppliedBatch, FeedbackApplier
from relay.feedback.parse import Unparseable, events, loads, parse
from relay.log import event

log = logging.getLogger("relay.sns")

Fetch = Callable[[str], Awaitable[bytes]]

NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn",
                     "Type")
HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
MAX_BODY = 256 * 1024


class Rejected(Exception):
    """The request is not a genuine SNS message for an accepted topic."""


def topic_region(topic_arn: str) -> str:
    m = re.fullmatch(r"arn:aws(?:-[a-z]+)*:sns:([a-z0-9-]+):\d{12}:[\w-]+", topic_arn)
    if not m:
        raise Rejected(f"bad TopicArn {topic_arn!r}")
    return m.group(1)


def check_url(url: str, topic_arn: str, *, cert: bool = True) -> None:
    """Raise Rejected unless url is an SNS URL of the topic's region (checked pre-fetch)."""
    region = topic_region(topic_arn)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Rejected("unparseable URL") from None
    hosts = (f"sns.{region}.amazonaws.com", f"sns.{region}.amazonaws.com.cn")
    if parts.scheme != "https" or parts.username is not None or parts.password is not None \
            or port is not None or "@" in parts.netloc or ":" in parts.netloc:
        raise Rejected(f"URL must be plain https with no userinfo or port: {url!r}")
    if parts.hostname not in hosts or parts.netloc not in hosts:
        raise Rejected(f"URL host is not {hosts[0]}: {url!r}")
    if parts.fragment:
        raise Rejected(f"URL has a fragment: {url!r}")
    if cert and (parts.query or not re.fullmatch(r"/SimpleNotificationService-[0-9a-f]+\.pem",
                                                 parts.path)):
        raise Rejected(f"not an SNS signing certificate path: {url!r}")


def string_to_sign(msg: dict[str, Any]) -> bytes:
    keys = NOTIFICATION_KEYS if msg.get("Type") == "Notification" else CONFIRMATION_KEYS
    return "".join(f"{k}\n{msg[k]}\n" for k in keys if k in msg and msg[k] is not None).encode()


async def https_fetch(url: str) -> bytes:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise Rejected(f"{url} answered {resp.status}")
            return await resp.content.read(64 * 1024)


class Verifier:
    """Checks an SNS envelope: accepted topic, signature version, certificate URL, signature.

    pinned: certificate URL -> public key trusted without a fetch or URL check (only the
    embedded sandbox's signing key, handed over in-process by relay.service).
    """

    def __init__(self, *, topic_arns: Iterable[str], fetch: Fetch = https_fetch,
                 pinned: dict[str, rsa.RSAPublicKey] | None = None) -> None:
        self.topic_arns = frozenset(topic_arns)
        self.fetch = fetch
        self.pinned = dict(pinned or {})
        self._keys: dict[str, rsa.RSAPublicKey] = {}

    async def verify(self, msg: dict[str, Any]) -> None:
        """Raise Rejected unless msg is signed by SNS for an accepted topic; OSError or
        aiohttp.ClientError when the certificate cannot be fetched (try again later)."""
        topic = msg.get("TopicArn")
        if not isinstance(topic, str) or topic not in self.topic_arns:
            raise Rejected(f"topic not in feedback.topic_arns: {topic!r}")
        version = msg.get("SignatureVersion")
        if version not in HASHES:
            raise Rejected(f"unsupported SignatureVersion {version!r}")
        url = msg.get("SigningCertURL")
        if not isinstance(url, str):
            raise Rejected("no SigningCertURL")
        if url not in self.pinned:
            check_url(url, topic)
        try:
            signature = base64.b64decode(str(msg.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("Signature is not base64") from None
        key = await self._key(url)
        try:
            key.verify(signature, string_to_sign(msg), padding.PKCS1v15(), HASHES[version]())
        except InvalidSignature:
            raise Rejected("signature does not verify") from None

    async def _key(self, url: str) -> rsa.RSAPublicKey:
        if url in self.pinned:
            return self.pinned[url]
        if url not in self._keys:
            pem = await self.fetch(url)
            try:
                key = x509.load_pem_x509_certificate(pem).public_key()
            except ValueError:
                raise Rejected("certificate is not PEM") from None
            if not isinstance(key, rsa.RSAPublicKey):
                raise Rejected("certificate key is not RSA")
            self._keys[url] = key
        return self._keys[url]

    def close(self) -> None:
        self._keys.clear()


class SnsEndpoint:
    def __init__(self, *, applier: FeedbackApplier, verifier: Verifier,
                 confirm: Fetch | None = None,
                 on_batch: Callable[[AppliedBatch], Awaitable[None]] | None = None) -> None:
        self.applier = applier
        self.verifier = verifier
        self.confirm = confirm or verifier.fetch
        self.on_batch = on_batch
        self.rejected = 0
        self.unparseable = 0

    async def handle(self, request: web.Request) -> web.Response:
        """POST /sns: verify, then confirm a subscription or apply a notification."""
        body = await self._read(request)
        if isinstance(body, web.Response):
            return body
        raw, msg = body
        refused = await self._check(msg)
        if refused is not None:
            return refused
        if msg["Type"] == "SubscriptionConfirmation":
            return await self._subscribe(msg)
        if msg["Type"] == "UnsubscribeConfirmation":
            event(log, "sns_unsubscribed", level=logging.WARNING, topic=msg["TopicArn"])
            return web.Response(text="ok\n")
        return await self._notify(raw)

    async def _read(self, request: web.Request) -> tuple[bytes, dict[str, Any]] | web.Response:
        """A POST body and its SNS message of a known type, or the answer refusing it."""
        if (request.content_length or 0) > MAX_BODY:
            return web.Response(status=413, text="too large\n")
        raw = await request.read()
        if len(raw) > MAX_BODY:
            return web.Response(status=413, text="too large\n")
        try:
            msg = loads(raw)
        except Unparseable:
            msg = None
        if not isinstance(msg, dict):
            self.unparseable += 1
            event(log, "feedback_unparseable", level=logging.WARNING, via="sns",
                  error="not a JSON object, or nested too deep")
            return web.Response(status=400, text="not an SNS message\n")
        if msg.get("Type") not in ("Notification", "SubscriptionConfirmation",
                                   "UnsubscribeConfirmation"):
            return web.Response(status=400, text="unknown SNS message type\n")
        return raw, msg

    async def _check(self, msg: dict[str, Any]) -> web.Response | None:
        """None when the message is signed by SNS for an accepted topic (and a subscription's
        URL is an SNS URL); else the answer refusing it."""
        try:
            await self.verifier.verify(msg)
            if msg["Type"] == "SubscriptionConfirmation":
                check_url(str(msg.get("SubscribeURL", "")), str(msg["TopicArn"]), cert=False)
        except Rejected as exc:
            self.rejected += 1
            event(log, "sns_rejected", level=logging.WARNING, error=str(exc))
            return web.Response(status=403, text="forbidden\n")
        except (OSError, aiohttp.ClientError) as exc:
            event(log, "sns_cert_unavailable", level=logging.WARNING, error=str(exc))
            return web.Response(status=503, text="certificate unavailable, retry\n")
        return None

    async def _subscribe(self, msg: dict[str, Any]) -> web.Response:
        try:
            await self.confirm(str(msg["SubscribeURL"]))
        except (Rejected, OSError, aiohttp.ClientError) as exc:
            event(log, "sns_confirm_failed", level=logging.WARNING, error=str(exc))
            return web.Response(status=503, text="confirmation failed, retry\n")
        event(log, "sns_subscribed", topic=msg["TopicArn"])
        return web.Response(text="confirmed\n")

    async def _notify(self, raw: bytes) -> web.Response:
        try:
            note = parse(raw)
            batch = await self.applier.apply_batch([(note, events(note))])
        except Unparseable as exc:
            self.unparseable += 1
            event(log, "feedback_unparseable", level=logging.WARNING, via="sns", error=str(exc))
            return web.Response(status=400, text="not an SES notification\n")
        event(log, "feedback", via="sns", outcome=batch.outcomes[0],
              recipients=batch.suppressed, suppressed=len(batch.suppressed))
        if self.on_batch is not None and batch.events:
            await self.on_batch(batch)
        return web.Response(text="ok\n")

    async def close(self) -> None:
        self.verifier.close()
