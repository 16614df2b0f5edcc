"""The console's plumbing on the admin aiohttp application: every console route goes
through page() or action(), which apply the security headers, the login (admin.host not on
loopback), the read-only refusal, the CSRF and Origin checks, and the flash message carried
over a redirect. The pages themselves are in relay.ops.console.pages. Installed by
relay.service on the admin listener (worker 0); /metrics, /healthz, /readyz and /sns are
not console routes and need no login. host_check refuses every other path whose Host
header is not one of the listener's names (DNS rebinding, relay.ops.console.security);
those four keep answering any Host: scrapers, probes and SNS name the listener as they
like, they carry no cookie and change nothing without an SNS signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from relay.ops.console.html import Markup, h, page, url
from relay.ops.console.security import CSRF_COOKIE, HEADERS, SESSION_COOKIE, Guard

PageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FLASH_COOKIE = "relay_flash"
#: what the rules found out about a request, for the page handlers
USER = web.RequestKey("user", str)
CSRF = web.RequestKey("csrf", str)
NEW_CSRF = web.RequestKey("new_csrf", bool)
FLASH = web.RequestKey("flash", str)
STATIC = Path(__file__).resolve().parent / "static"
#: the admin listener's own routes, which answer whatever the Host header says
ANY_HOST = frozenset({"/metrics", "/healthz", "/readyz", "/sns"})


class Plumbing:
    """The request rules every console route shares."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    # -- the rules ----------------------------------------------------------------------

    def user(self, request: web.Request) -> str | None:
        g = self.guard
        return (g.bearer_user(request.headers.get("Authorization"))
                or g.session_user(request.cookies.get(SESSION_COOKIE)))

    def banner(self) -> Markup:
        reason = self.guard.read_only
        return h('<p id="read-only" class="banner">{}</p>', reason) if reason else Markup("")

    def render(self, request: web.Request, title: str, body: Markup, *, here: str = "/",
               status: int = 200) -> web.Response:
        return web.Response(text=page(title, body, here=here, banner=self.banner(),
                                      flash=request.get(FLASH, ""),
                                      user=request.get(USER) or ""),
                            status=status, content_type="text/html", charset="utf-8")

    def refuse(self, text: str, status: int = 403) -> web.Response:
        return web.Response(text=text + "\n", status=status, content_type="text/plain")

    def _flash_mac(self, text: str) -> str:
        return hmac.new(self.guard.secret, b"flash:" + text.encode(),
                        hashlib.sha256).hexdigest()[:32]

    def flash_cookie(self, text: str) -> str:
        enc = base64.urlsafe_b64encode(text.encode()[:1500]).decode()
        return f"{enc}.{self._flash_mac(enc)}"

    def read_flash(self, cookie: str | None) -> str:
        if not cookie or "." not in cookie:
            return ""
        enc, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._flash_mac(enc)):
            return ""
        try:
            return base64.urlsafe_b64decode(enc.encode()).decode("utf-8", "replace")
        except (ValueError, binascii.Error):
            return ""

    def redirect(self, location: str, flash: str = "") -> web.Response:
        resp = web.Response(status=303, headers={"Location": location})
        if flash:
            resp.set_cookie(FLASH_COOKIE, self.flash_cookie(flash), httponly=True,
                            samesite="Strict", path="/")
        return resp

    # -- wrappers -----------------------------------------------------------------------

    def host_check(self) -> Any:
        """The middleware that answers 421 to a console request for a name not ours."""
        @web.middleware
        async def check(request: web.Request, handler: PageHandler) -> web.StreamResponse:
            if request.path not in ANY_HOST:
                refusal = self.guard.host_refusal(request.headers.get("Host"))
                if refusal:
                    resp = self.refuse(refusal, status=421)
                    resp.headers.update(HEADERS)
                    return resp
            return await handler(request)
        return check

    def _finish(self, request: web.Request, resp: web.StreamResponse,
                headers: dict[str, str] | None = None) -> web.StreamResponse:
        for k, v in (headers or HEADERS).items():
            resp.headers[k] = v
        if request.get(NEW_CSRF):
            resp.set_cookie(CSRF_COOKIE, request[CSRF], httponly=True, samesite="Strict",
                            path="/")
        if request.get(FLASH):
            resp.del_cookie(FLASH_COOKIE, path="/")
        return resp

    def _prepare(self, request: web.Request, public: bool = False
                 ) -> web.StreamResponse | None:
        """Login, CSRF cookie and flash for any console request; a response ends it."""
        user = self.user(request)
        request[USER] = (user or "") if self.guard.login_required else ""
        if self.guard.login_required and user is None and not public:
            if request.method == "GET":
                return self.redirect(url("/login", next=request.path_qs)
                                     if request.path != "/" else "/login")
            return self.refuse("Refused: log in to the console first (/login).")
        cookie = request.cookies.get(CSRF_COOKIE)
        if cookie is not None and self.guard.csrf_valid(cookie):
            request[CSRF] = cookie
        else:
            request[CSRF], request[NEW_CSRF] = self.guard.new_csrf(), True
        request[FLASH] = self.read_flash(request.cookies.get(FLASH_COOKIE))
        return None

    def page(self, handler: PageHandler, *, headers: dict[str, str] | None = None,
             public: bool = False) -> PageHandler:
        async def run(request: web.Request) -> web.StreamResponse:
            early = self._prepare(request, public)
            if early is not None:
                return self._finish(request, early)
            try:
                resp = await handler(request)
            except (SQLAlchemyError, OSError) as exc:
                resp = self.unavailable(request, exc)
            return self._finish(request, resp, headers)
        return run

    def unavailable(self, request: web.Request, exc: Exception) -> web.Response:
        """A page whose database or files did not answer: 503 with the reason, the rest of
        the console still works."""
        what = "database" if isinstance(exc, SQLAlchemyError) else "spool"
        first = (str(exc).splitlines() or [""])[0][:300]
        return self.render(request, "Not available", h(
            '<p class="error">The {} did not answer: {}: {}. /readyz says more.</p>',
            what, type(exc).__name__, first), status=503)

    def action(self, handler: Callable[[web.Request, Any], Awaitable[web.StreamResponse]],
               *, login: bool = False) -> PageHandler:
        """A POST: refused when read-only (unless it is the login itself), without a
        valid CSRF token, or from another origin; the handler gets the posted form."""
        async def run(request: web.Request) -> web.StreamResponse:
            early = self._prepare(request, public=login)
            if early is not None:
                return self._finish(request, early)
            if self.guard.read_only and not login:
                return self._finish(request, self.refuse(self.guard.read_only))
            form = await request.post()
            token = form.get("csrf")
            refusal = self.guard.csrf_refusal(
                request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None,
                request.headers, request.host)
            if refusal:
                return self._finish(request, self.refuse(refusal))
            try:
                resp = await handler(request, form)
            except (SQLAlchemyError, OSError) as exc:
                resp = self.unavailable(request, exc)
            return self._finish(request, resp)
        return run


async def static_css(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "console.css",
                            headers={"Content-Type": "text/css; charset=utf-8",
                                     "Cache-Control": "max-age=300"})
