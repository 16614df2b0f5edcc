"""The console's routes: each handler reads through relay.ops.console.data (spool, in a
thread), relay.store.lookup and the suppression list, and renders a view. Console.install
adds them to the admin application; the rules every route shares are in app.Plumbing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from relay.errors import ConfigError
from relay.ops.console import data, sandbox, views_log, views_overview, views_queue
from relay.ops.console.app import CSRF, Plumbing, static_css
from relay.ops.console.html import Markup, h, hidden_csrf
from relay.ops.console.security import SANDBOX_CSP, SESSION_COOKIE, Guard
from relay.ops.console.sources import Sources
from relay.ops.queue_cli import cli_duration
from relay.spool.queue import STATES, QueueError
from relay.store import lookup
from relay.store.suppression import MANUAL, REASONS, parse_csv, to_csv, valid

SANDBOX_HEADERS = {"Content-Security-Policy": SANDBOX_CSP, "X-Content-Type-Options": "nosniff",
                   "X-Frame-Options": "SAMEORIGIN", "Referrer-Policy": "no-referrer",
                   "Cache-Control": "no-store"}


def _one(results: list[tuple[str, str, bool]]) -> str:
    ok = sum(1 for _, _, good in results if good)
    lines = [what for _, what, _ in results[:5]]
    more = f" (and {len(results) - 5} more)" if len(results) > 5 else ""
    return f"{ok} of {len(results)} message(s): " + "; ".join(lines) + more


def local_path(target: str) -> bool:
    """A redirect target on this console: a path, never another host (//x, /\\x, x:)."""
    return (target.startswith("/") and not target.startswith(("//", "/\\"))
            and "\\" not in target and not any(c < " " for c in target))


class Console:
    def __init__(self, sources: Sources, guard: Guard) -> None:
        self.src = sources
        self.guard = guard
        self.p = Plumbing(guard)
        #: each state's sorted queue ids, listed again only when the directory changed
        self.ids = data.SortedIds(sources.queue)

    def install(self, app: web.Application) -> None:
        p, r = self.p, app.router
        app.middlewares.append(p.host_check())
        r.add_get("/", p.page(self.overview))
        r.add_get("/static/console.css", static_css)
        r.add_get("/login", p.page(self.login_page, public=True))
        r.add_post("/login", p.action(self.login, login=True))
        r.add_get("/logout", self.logout)
        r.add_get("/queue", p.page(self.queue))
        r.add_post("/queue/actions", p.action(self.queue_actions))
        r.add_get("/queue/{qid}", p.page(self.message))
        r.add_get("/queue/{qid}/raw", p.page(self.raw))
        r.add_post("/queue/{qid}/{verb}", p.action(self.message_action))
        r.add_get("/log", p.page(self.log))
        r.add_get("/log/{qid}", p.page(self.timeline))
        r.add_get("/suppressions", p.page(self.suppressions))
        r.add_get("/suppressions.csv", p.page(self.export))
        r.add_post("/suppressions/add", p.action(self.suppress_add))
        r.add_post("/suppressions/remove", p.action(self.suppress_remove))
        r.add_post("/suppressions/import", p.action(self.suppress_import))
        r.add_get("/sandbox", p.page(self.sandbox))
        r.add_get("/sandbox/{mid}", p.page(self.sandbox_message))
        r.add_get("/sandbox/{mid}/html", p.page(self.sandbox_html, headers=SANDBOX_HEADERS))

    # -- overview -----------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        status = self.src.status()
        counts = await asyncio.to_thread(data.counts, self.src.queue, now=now,
                                         lanes=self.src.lanes, ids=self.ids)
        problems = await self.src.readiness()
        try:
            per_minute, latest = await asyncio.gather(
                lookup.sent_per_minute(self.src.db, now=now), lookup.latest_event(self.src.db))
        except SQLAlchemyError:  # the chart says so; readiness names the database's problem
            per_minute, latest = [], None
        body = views_overview.overview(counts=counts, status=status, per_minute=per_minute,
                                       problems=problems, latest=latest, now=now)
        return self.p.render(request, "Overview", body, here="/")

    # -- login --------------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        nxt = request.query.get("next", "/")
        fields = Markup("")
        if self.guard.verify is not None:
            fields = Markup('<label>user <input name="user" autocomplete="username"></label>'
                            '<label>password <input type="password" name="password" '
                            'autocomplete="current-password"></label>')
        if self.guard.token:
            fields = fields + Markup('<label>token <input type="password" name="token">'
                                     '</label>')
        if not self.guard.login_required:
            body = Markup('<p>This console needs no login (the admin listener is on '
                          'loopback, or no login is configured).</p>')
        else:
            body = h('<form method="post" action="/login" class="login">{}'
                     '<input type="hidden" name="next" value="{}">{}'
                     '<button type="submit">Log in</button></form>',
                     hidden_csrf(request[CSRF]), nxt, fields)
        return self.p.render(request, "Log in", body)

    async def login(self, request: web.Request, form: Any) -> web.StreamResponse:
        user = await asyncio.to_thread(
            self.guard.check_login, user=str(form.get("user", "")),
            password=str(form.get("password", "")), token=str(form.get("token", "")))
        if user is None:
            return self.p.redirect("/login", "Wrong user, password or token.")
        nxt = str(form.get("next", "/"))
        resp = self.p.redirect(nxt if local_path(nxt) else "/")
        resp.set_cookie(SESSION_COOKIE, self.guard.session(user), httponly=True,
                        samesite="Strict", path="/")
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        resp = self.p.redirect("/login" if self.guard.login_required else "/")
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- queue --------------------------------------------------------------------------

    def _filter(self, request: web.Request) -> tuple[data.Filter, str, str]:
        q = request.query
        min_age, problem, seconds = q.get("min_age", "").strip(), "", 0.0
        if min_age:
            try:
                seconds = cli_duration("min_age", min_age)
            except ConfigError as exc:
                problem = str(exc)
        state = q.get("state", "")
        if state and state not in {s.value for s in STATES}:
            problem, state = f"state: no such state {state!r}", ""
        after = q.get("after", "")
        return data.Filter(state=state, lane=q.get("lane", ""), sender=q.get("sender", ""),
                           domain=q.get("domain", ""), min_age=seconds,
                           error=q.get("error", ""),
                           after=after if data.valid_qid(after) else ""), min_age, problem

    async def queue(self, request: web.Request) -> web.StreamResponse:
        f, min_age, problem = self._filter(request)
        now = time.time()
        pg = await asyncio.to_thread(data.queue_page, self.src.queue, f, now=now, ids=self.ids)
        body = views_queue.queue(pg, f, csrf=request[CSRF], lanes=self.src.lanes,
                                 min_age=min_age, now=now, read_only=bool(self.guard.read_only))
        if problem:
            body = h('<p class="error" id="filter-error">{}</p>', problem) + body
        return self.p.render(request, "Queue", body, here="/queue",
                             status=400 if problem else 200)

    async def queue_actions(self, request: web.Request, form: Any) -> web.StreamResponse:
        ids = [str(v) for v in form.getall("qid", [])]
        verb, back = str(form.get("action", "")), str(form.get("back", "/queue"))
        back = back if back.startswith("/queue") else "/queue"  # never off the console
        if not ids:
            return self.p.redirect(back, "Select one or more messages first.")
        try:
            results = await asyncio.to_thread(data.act, self.src.queue, verb, ids)
        except QueueError as exc:
            return self.p.redirect(back, str(exc))
        return self.p.redirect(back, f"{verb}: {_one(results)}")

    def _missing(self, request: web.Request, text: str) -> web.Response:
        return self.p.render(request, "Not found", h('<p class="error">{}</p>', text),
                             status=404)

    async def message(self, request: web.Request) -> web.StreamResponse:
        qid = request.match_info["qid"]
        if not data.valid_qid(qid):
            return self._missing(request, f"{qid!r} is not a queue id.")
        try:
            doc = await asyncio.to_thread(data.message, self.src.queue, qid, now=time.time())
        except QueueError as exc:
            return self._missing(request, f"{exc}. It may have been delivered: see the log "
                                          f"(/log/{qid}).")
        body = views_queue.message(doc, csrf=request[CSRF], now=time.time(),
                                   read_only=bool(self.guard.read_only))
        return self.p.render(request, f"Message {qid}", body, here="/queue")

    async def raw(self, request: web.Request) -> web.StreamResponse:
        qid = request.match_info["qid"]
        if not data.valid_qid(qid):
            return self._missing(request, f"{qid!r} is not a queue id.")
        try:
            body = await asyncio.to_thread(data.raw, self.src.queue, qid)
        except QueueError as exc:
            return self._missing(request, str(exc))
        return web.Response(body=body, headers={
            "Content-Type": "message/rfc822",
            "Content-Disposition": f'attachment; filename="{qid}.eml"'})

    async def message_action(self, request: web.Request, form: Any) -> web.StreamResponse:
        qid, verb = request.match_info["qid"], request.match_info["verb"]
        try:
            results = await asyncio.to_thread(data.act, self.src.queue, verb, [qid])
        except QueueError as exc:
            return self.p.redirect("/queue", str(exc))
        _, what, good = results[0]
        gone = verb == "delete" and good
        return self.p.redirect("/queue" if gone else f"/queue/{qid}",
                               f"{verb}: {what}" if good else what)

    # -- log ----------------------------------------------------------------------------

    async def log(self, request: web.Request) -> web.StreamResponse:
        q = request.query.get("q", "").strip()
        rows = await lookup.search(self.src.db, q) if q else []
        return self.p.render(request, "Log", views_log.log(q, rows), here="/log")

    async def timeline(self, request: web.Request) -> web.StreamResponse:
        qid = request.match_info["qid"]
        rows, events = await lookup.message(self.src.db, qid)
        return self.p.render(request, f"Timeline of {qid}", views_log.timeline(qid, rows, events),
                             here="/log")

    # -- suppressions -------------------------------------------------------------------

    async def suppressions(self, request: web.Request) -> web.StreamResponse:
        q, after = request.query.get("q", ""), request.query.get("after", "")
        entries = await lookup.suppressions(self.src.db, q=q, after=after, limit=101)
        nxt = entries[99].entry.address if len(entries) > 100 else ""
        body = views_log.suppressions(q, entries[:100], csrf=request[CSRF],
                                      read_only=bool(self.guard.read_only), next_after=nxt)
        return self.p.render(request, "Suppressions", body, here="/suppressions")

    async def export(self, request: web.Request) -> web.StreamResponse:
        text = to_csv(await self.src.suppressions.entries())
        return web.Response(text=text, content_type="text/csv", headers={
            "Content-Disposition": 'attachment; filename="suppressions.csv"'})

    async def suppress_add(self, request: web.Request, form: Any) -> web.StreamResponse:
        address, reason = str(form.get("address", "")).strip(), str(form.get("reason", MANUAL))
        if not valid(address):
            return self.p.redirect("/suppressions", f"Not an email address: {address!r}.")
        if reason not in REASONS:
            return self.p.redirect("/suppressions", f"Unknown reason {reason!r}.")
        new = await self.src.suppressions.add(address, reason=reason, source="console")
        return self.p.redirect("/suppressions?q=" + address,
                               f"{address} {'added' if new else 'was already suppressed'}.")

    async def suppress_remove(self, request: web.Request, form: Any) -> web.StreamResponse:
        address = str(form.get("address", "")).strip()
        gone = await self.src.suppressions.remove(address)
        return self.p.redirect("/suppressions", f"{address} removed." if gone
                               else f"{address} was not on the list.")

    async def suppress_import(self, request: web.Request, form: Any) -> web.StreamResponse:
        upload = form.get("csv")
        raw = upload.file.read() if hasattr(upload, "file") else str(upload or "").encode()
        try:
            rows = parse_csv(raw.decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as exc:
            return self.p.redirect("/suppressions", f"Import refused, nothing added: {exc}")
        added = await self.src.suppressions.import_rows(rows, source="import")
        return self.p.redirect("/suppressions",
                               f"Imported {len(rows)} address(es), {added} new.")

    # -- sandbox ------------------------------------------------------------------------

    def _no_sandbox(self, request: web.Request) -> web.Response:
        return self._missing(request, sandbox.NOT_SANDBOX)

    async def sandbox(self, request: web.Request) -> web.StreamResponse:
        outbox = self.src.sandbox_dir
        if outbox is None:
            return self._no_sandbox(request)
        items, nxt = await asyncio.to_thread(sandbox.listing, outbox,
                                             before=request.query.get("before", ""))
        feedback = await lookup.events_for(self.src.db, [m.id for m in items])
        return self.p.render(request, "Sandbox mail",
                             sandbox.outbox_page(items, feedback, nxt), here="/sandbox")

    async def sandbox_message(self, request: web.Request) -> web.StreamResponse:
        outbox, mid = self.src.sandbox_dir, request.match_info["mid"]
        if outbox is None:
            return self._no_sandbox(request)
        shown = await asyncio.to_thread(sandbox.read, outbox, mid)
        if shown is None:
            return self._missing(request, f"No sandbox message {mid!r}.")
        events = (await lookup.events_for(self.src.db, [mid])).get(mid, [])
        return self.p.render(request, "Sandbox message", sandbox.message_page(shown, events),
                             here="/sandbox")

    async def sandbox_html(self, request: web.Request) -> web.StreamResponse:
        outbox, mid = self.src.sandbox_dir, request.match_info["mid"]
        if outbox is None:
            return self._no_sandbox(request)
        shown = await asyncio.to_thread(sandbox.read, outbox, mid)
        if shown is None or shown.html is None:
            return web.Response(status=404, text="no HTML part\n")
        return web.Response(text=shown.html, content_type="text/html", charset="utf-8")
