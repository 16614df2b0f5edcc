"""The console's safety rules: security headers, the CSRF token, the Origin check, the
login and the read-only mode. Pure decisions over plain values (no aiohttp here), so the
unit tests call them directly; relay.ops.console.app applies them to every request.

CSRF: a double-submit token. The cookie relay_csrf holds NONCE.MAC (MAC: HMAC of the nonce
with a secret made at start-up), every form carries the same value in its hidden `csrf`
field; a POST passes only when both are there, equal, and the MAC is ours.
Login (admin.host not on loopback): admin.console_token, or admin.console_login =
"credentials" (the SMTP AUTH scrypt file); a login gives a signed relay_session cookie.
Host (DNS rebinding: a hostile name re-resolved to this listener would make its page
same-origin with the console): the Host header must be an IP address literal (no page can
rebind one) or a name the listener is known by: localhost, admin.host, admin.allowed_hosts.
The port is not compared: a rebinding page controls the name, and a port-forward changes
the port.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: every console page; the sandbox's HTML route has its own, stricter one (SANDBOX_CSP)
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; frame-ancestors 'none'")
#: a sandbox message's HTML: no script, no remote anything, its own opaque origin
SANDBOX_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store"}
CSRF_COOKIE = "relay_csrf"
SESSION_COOKIE = "relay_session"
#: seconds a console login lasts
SESSION_TTL = 12 * 3600.0


def is_loopback(host: str) -> bool:
    """Whether admin.host listens on loopback only ("localhost" counts; 0.0.0.0 does not)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_only_reason(host: str, *, token: str, login: str) -> str:
    """Why the console must refuse every action, or "" when it may act."""
    if is_loopback(host) or token or login:
        return ""
    return (f"The admin listener is on {host}, not loopback, and no console login is "
            "configured, so the console is read-only: set admin.console_token, or "
            'admin.console_login = "credentials" with smtp.auth_file, to allow actions.')


def host_name(header: str) -> str:
    """The name of a Host header value, without its port or IPv6 brackets, lower-case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else value


def host_allowed(header: str | None, names: tuple[str, ...]) -> bool:
    """Whether a request's Host header is an IP literal or one of `names` (any port)."""
    if not header:
        return False
    name = host_name(header)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in {"localhost", *(host_name(n) for n in names)}


def same_origin(headers: Mapping[str, str], host: str) -> bool:
    """The Origin (else the Referer) header, when present, names this host:port."""
    for name in ("Origin", "Referer"):
        value = headers.get(name)
        if value is None:
            continue
        if value == "null":
            return False
        try:
            netloc = urlsplit(value).netloc
        except ValueError:
            return False
        return bool(netloc) and netloc.lower() == host.lower()
    return True


@dataclass
class Guard:
    """The per-process secret and the login settings; decisions for app.py."""

    host: str
    token: str = ""
    #: admin.allowed_hosts: more names this listener answers to (a proxy, a port-forward)
    allowed_hosts: tuple[str, ...] = ()
    #: name, password -> whether the pair is right (the SMTP AUTH file), when configured
    verify: Callable[[str, str], bool] | None = None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    clock: Callable[[], float] = time.time

    @property
    def read_only(self) -> str:
        return read_only_reason(self.host, token=self.token,
                                login="credentials" if self.verify else "")

    @property
    def login_required(self) -> bool:
        return not is_loopback(self.host) and bool(self.token or self.verify)

    def host_refusal(self, header: str | None) -> str:
        """Why a request naming this Host is refused ("" when it is one of ours)."""
        if host_allowed(header, (self.host, *self.allowed_hosts)):
            return ""
        return (f"Refused: this console does not answer to the name {(header or '')[:100]!r} "
                "(the Host header). Browse to it by localhost, an IP address or admin.host, "
                "or add the name to admin.allowed_hosts.")

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    # -- CSRF -------------------------------------------------------------------------

    def new_csrf(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._mac('csrf:' + nonce)}"

    def csrf_valid(self, cookie: str | None) -> bool:
        """A cookie this process issued (never one planted by someone else)."""
        if not cookie or "." not in cookie:
            return False
        nonce, _, mac = cookie.partition(".")
        return hmac.compare_digest(mac, self._mac("csrf:" + nonce))

    def csrf_refusal(self, cookie: str | None, field_value: str | None,
                     headers: Mapping[str, str], host: str) -> str:
        """Why a POST is refused ("" when it passes the CSRF and Origin checks)."""
        if not same_origin(headers, host):
            return "Refused: this form was posted from another site (Origin/Referer)."
        if not field_value or not cookie:
            return ("Refused: the form carried no CSRF token. Reload the page and try again "
                    "(cookies must be on for the console).")
        if not self.csrf_valid(cookie) or not hmac.compare_digest(cookie, field_value):
            return "Refused: the CSRF token is wrong or stale. Reload the page and try again."
        return ""

    # -- login ------------------------------------------------------------------------

    def check_login(self, *, user: str, password: str, token: str) -> str | None:
        """The name logged in as (token logins are "token"), or None."""
        if token and self.token and hmac.compare_digest(token.encode(), self.token.encode()):
            return "token"
        if user and password and self.verify is not None and self.verify(user, password):
            return user
        return None

    def session(self, user: str) -> str:
        expires = int(self.clock() + SESSION_TTL)
        body = f"{user}|{expires}"
        return f"{body}|{self._mac('session:' + body)}"

    def session_user(self, cookie: str | None) -> str | None:
        if not cookie or cookie.count("|") < 2:
            return None
        body, _, mac = cookie.rpartition("|")
        user, _, expires = body.rpartition("|")
        if not hmac.compare_digest(mac, self._mac("session:" + body)):
            return None
        try:
            if float(expires) < self.clock():
                return None
        except ValueError:
            return None
        return user

    def bearer_user(self, authorization: str | None) -> str | None:
        if not authorization or not self.token:
            return None
        kind, _, value = authorization.partition(" ")
        if kind.lower() != "bearer":
            return None
        return self.check_login(user="", password="", token=value.strip())
