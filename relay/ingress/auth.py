"""SMTP AUTH PLAIN and LOGIN for the ingress, checked against relay.ingress.credentials.

The scrypt check runs in a worker thread; failures are answered 535 5.7.8 (never left
unanswered: aiosmtpd answers a failure only when it is marked handled=False), delayed and,
past smtp.auth_max_failures, refused with 454 4.7.0 for smtp.auth_lockout
(relay.ingress.limits.AuthThrottle). A malformed attempt (not base64, not a PLAIN blob, a
challenge aborted with "*") counts as a failure too. Mixed into relay.ingress.server.IngressHandler;
aiosmtpd finds the auth_* methods on the handler.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.ingress.credentials import Credentials
from relay.ingress.limits import AuthThrottle
from relay.ingress.replies import AUTH_FAILED, AUTH_LOCKED, AUTH_OK, BAD_BASE64, Reply
from relay.log import event

log = logging.getLogger("relay.smtp")


def _refused(reply: Reply) -> AuthResult:
    """A failure aiosmtpd leaves to us to answer (handled=False), answered with `reply`."""
    return AuthResult(success=False, handled=False, message=reply.line)


def _client(server: SMTP) -> str:
    return str(server.session.peer[0]) if server.session and server.session.peer else ""


class AuthHooks:
    credentials: Credentials | None
    throttle: AuthThrottle

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:  # aiosmtpd answered it (501: aborted or not base64)
                return await self._malformed(server, None)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                return await self._malformed(server, BAD_BASE64)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return await self._malformed(server, BAD_BASE64)
        return await self._authenticate(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return await self._malformed(server, None)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                return await self._malformed(server, BAD_BASE64)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return await self._malformed(server, None)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._authenticate(server, login, password)

    async def _malformed(self, server: SMTP, reply: Reply | None) -> AuthResult:
        """A malformed attempt, counted as a failure; `reply` None: aiosmtpd answered it."""
        client = _client(server)
        if not self.throttle.locked(client):
            delay = self.throttle.failure(client)
            event(log, "auth_failed", level=logging.WARNING, client=client, delay=delay,
                  reason="malformed", locked=bool(self.throttle.locked(client)))
            if delay:
                await asyncio.sleep(delay)
        elif reply is not None:
            reply = AUTH_LOCKED
        return AuthResult(success=False) if reply is None else _refused(reply)

    async def _authenticate(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        client = _client(server)
        if self.credentials is None:
            return _refused(AUTH_FAILED)
        left = self.throttle.locked(client)
        if left:
            event(log, "auth_locked", level=logging.WARNING, client=client, seconds=round(left))
            return _refused(AUTH_LOCKED)
        name = login.decode("utf-8", "replace")
        user = await asyncio.to_thread(
            self.credentials.verify, name, password.decode("utf-8", "replace"))
        if user is not None:
            self.throttle.success(client)
            event(log, "auth", client=client, user=name)
            return AuthResult(success=True, auth_data=user, message=AUTH_OK.line)
        delay = self.throttle.failure(client)
        event(log, "auth_failed", level=logging.WARNING, client=client, delay=delay,
              locked=bool(self.throttle.locked(client)))
        if delay:
            await asyncio.sleep(delay)
        return _refused(AUTH_FAILED)
