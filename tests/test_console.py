"""The console against a real relay on its embedded sandbox, through urllib: the overview
counts a waiting message, holding it from its page moves it to hold/ on disk, a POST
without the CSRF token changes nothing, a log search finds a bounced address, and a
sandbox message's HTML is served only under the strict CSP. A request naming another host
(DNS rebinding) gets 421 from every console route, while /healthz and /metrics answer it;
a CSV the csv module cannot read or with a too-long source is refused with a sentence.
Then a console whose admin.host is not loopback: read-only without a login, actions with
a token login."""

from __future__ import annotations

import asyncio
import html
import re
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from aiohttp import web

from relay.ops.console.pages import Console
from relay.ops.console.security import Guard
from relay.ops.console.sources import Sources, Status
from relay.spool.queue import Queue
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
from relay.store.db import Database
from relay.store.suppression import SuppressionList
from tests.conftest import wait_for

EVIL = "<script>alert(1)</script>"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


class Browser:
    """urllib with cookies, no redirects followed: answers are (status, headers, body)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  NoRedirect())

    def open(self, path: str, form: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()

    def post(self, path: str, body: bytes, content_type: str
             ) -> tuple[int, dict[str, str], str]:
        """A POST of a body already encoded (multipart, repeated fields)."""
        req = urllib.request.Request(self.base + path, data=body,
                                     headers={"Content-Type": content_type})
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()

    def csrf(self, page: str) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', page)
        assert m, "no CSRF field on the page"
        return html.unescape(m.group(1))


def send(port: int, to: str, subject: str = "hello", html_part: str = "") -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", to, subject
    msg.set_content("the text part")
    if html_part:
        msg.add_alternative(html_part, subtype="html")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg)


def test_hold_from_the_message_page_with_csrf_and_refusal_without(start_relay, tmp_path):
    relay = start_relay("sandbox", sandbox={"dir": str(tmp_path / "mail"), "faults": ["5xx"]},
                        delivery={"min_backoff": "1h", "max_backoff": "1h"})
    send(relay.smtp_port, "someone@example.net")
    [qid] = wait_for(lambda: relay.queued("deferred"), 30)
    b = Browser(f"http://127.0.0.1:{relay.admin_port}")
    code, headers, page = b.open("/")
    assert code == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert re.search(r'<tr data-state="deferred">.*?<td class="count">1</td>', page)

    code, _, page = b.open(f"/queue/{qid}")
    assert code == 200 and 'class="action-hold"' in page
    token = b.csrf(page)
    code, _, said = b.open(f"/queue/{qid}/hold", {})
    assert code == 403 and "CSRF" in said
    code, _, said = b.open(f"/queue/{qid}/hold", {"csrf": token},
                           {"Origin": "http://evil.example"})
    assert code == 403
    assert relay.queued("deferred") == [qid]

    code, headers, _ = b.open(f"/queue/{qid}/hold", {"csrf": token})
    assert code == 303 and headers["Location"] == f"/queue/{qid}"
    assert relay.queued("hold") == [qid] and (relay.spool / "hold" / qid).is_file()
    code, _, page = b.open(f"/queue/{qid}")
    assert '<p id="flash" role="status">hold: deferred -&gt; hold</p>' in page
    code, headers, raw = b.open(f"/queue/{qid}/raw")
    assert headers["Content-Type"] == "message/rfc822" and "the text part" in raw


def test_log_finds_a_bounce_and_the_sandbox_html_runs_no_script(start_relay, tmp_path):
    relay = start_relay("sandbox", sandbox={"dir": str(tmp_path / "mail")})
    send(relay.smtp_port, "bounce@simulator.amazonses.com", subject=EVIL,
         html_part=f'<p>hi</p>{EVIL}<img src="http://192.0.2.1/pixel.png">')
    b = Browser(f"http://127.0.0.1:{relay.admin_port}")

    def bounced() -> str | None:
        page = b.open("/log?q=bounce@simulator.amazonses.com")[2]
        return page if 'class="status-bounced"' in page else None

    page = wait_for(bounced, 60)
    assert 'class="log-row"' in page
    overview = b.open("/")[2]  # the send counted in the last minute's bar of the chart
    assert "1 recipient(s) sent in the last hour, 1 in the last minute" in overview
    page = b.open("/sandbox")[2]
    assert EVIL not in page and html.escape(EVIL) in page
    mid = re.search(r'<tr data-id="([^"]+)">', page)
    assert mid is not None
    page = b.open(f"/sandbox/{mid.group(1)}")[2]
    assert f'<iframe id="html-part" sandbox src="/sandbox/{mid.group(1)}/html"' in page
    assert EVIL not in page
    code, headers, body = b.open(f"/sandbox/{mid.group(1)}/html")
    assert code == 200 and EVIL in body  # as sent, but only under this policy:
    assert headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox")
    assert headers["X-Content-Type-Options"] == "nosniff"
    qid = re.search(r'data-qid="([^"]+)"', bounced() or "")
    assert qid is not None
    timeline = b.open(f"/log/{qid.group(1)}")[2]
    for step in ("queued", "sent", "bounced"):
        assert f'<li data-event="{step}">' in timeline


def test_sandbox_page_is_404_with_a_reason_when_sending_through_ses(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    code, _, page = Browser(f"http://127.0.0.1:{relay.admin_port}").open("/sandbox")
    assert code == 404 and "ses.endpoint_url" in page


def test_a_rebound_host_name_gets_421_from_the_console_but_not_from_the_probes(
        start_relay, tmp_path):
    relay = start_relay("sandbox", sandbox={"dir": str(tmp_path / "mail")},
                        admin={"allowed_hosts": ["relay.internal"]})
    port = relay.admin_port
    b = Browser(f"http://127.0.0.1:{port}")
    page = b.open("/suppressions")[2]
    token = b.csrf(page)  # what a rebinding page would take, were it let in
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for path in ("/", "/suppressions", "/suppressions.csv", "/static/console.css", "/login",
                 "/logout", "/queue", "/log", "/sandbox", "/no-such-page"):
        code, headers, said = b.open(path, headers=evil)
        assert code == 421, path
        assert "admin.allowed_hosts" in said and "<" not in said
        assert headers["X-Content-Type-Options"] == "nosniff"
    code, _, said = b.open("/suppressions/add", {"csrf": token, "address": "x@example.org",
                                                 "reason": "manual"}, evil)
    assert code == 421 and "x@example.org" not in b.open("/suppressions")[2]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert b.open(path, headers=evil)[0] == 200, path
    for host in (f"localhost:{port}", "relay.internal", "[::1]", "10.1.2.3:9000"):
        assert b.open("/suppressions", headers={"Host": host})[0] == 200, host

    def imported(csv: bytes) -> tuple[int, str]:
        body, boundary = _multipart({"csrf": token}, "csv", "list.csv", csv)
        code, _, _ = b.post("/suppressions/import", body,
                            f"multipart/form-data; boundary={boundary}")
        return code, b.open("/suppressions")[2]

    code, page = imported(b'address\nok@example.org\n"bad@example.org\n' + b"x" * 140_000)
    assert code == 303
    assert "Import refused, nothing added: line 3: cannot read the CSV" in page
    code, page = imported(b"address,source\nok@example.org," + b"s" * 33 + b"\n")
    assert code == 303 and "line 2: source" in page and "longer than 32" in page
    assert 'data-address="ok@example.org"' not in page
    code, page = imported(b"address,source\nok@example.org," + b"s" * 32 + b"\n")
    assert "Imported 1 address(es), 1 new." in page
    assert 'data-address="ok@example.org"' in page
    assert not any("Traceback" in line for line in relay.raw_lines)


async def _serve(guard: Guard, root: Path) -> tuple[web.AppRunner, str, Spool]:
    spool = Spool(root / "spool", fsync=False)
    spool.ensure()
    db = await Database.open("", spool.root)
    app = web.Application()
    app.on_cleanup.append(lambda _: db.close())

    async def ready() -> list[str]:
        return []

    Console(Sources(queue=Queue(spool), db=db, suppressions=SuppressionList(db),
                    status=Status, readiness=ready), guard).install(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", spool


@pytest.mark.parametrize("token", ["", "a-long-console-token-0123"])
async def test_non_loopback_console_is_read_only_without_login_and_acts_with_one(
        tmp_path, token):
    # the rules follow admin.host; the listener itself stays on loopback for the test
    runner, base, spool = await _serve(Guard(host="0.0.0.0", token=token), tmp_path)
    try:
        qid = spool.accept(Envelope("a@x.example", ("b@y.example",), 0.0), b"\r\nm\r\n")
        b = Browser(base)
        if not token:
            code, _, page = await asyncio.to_thread(b.open, f"/queue/{qid}")
            assert code == 200 and 'id="read-only"' in page and "admin.console_token" in page
            code, _, said = await asyncio.to_thread(b.open, f"/queue/{qid}/hold",
                                                    {"csrf": b.csrf(page)})
            assert code == 403 and "read-only" in said
            assert spool.locate(qid) is State.ACTIVE
            return
        code, headers, _ = await asyncio.to_thread(b.open, f"/queue/{qid}")
        assert code == 303 and headers["Location"].startswith("/login")
        code, _, page = await asyncio.to_thread(b.open, "/login")
        code, _, _ = await asyncio.to_thread(b.open, "/login", {
            "csrf": b.csrf(page), "token": "wrong", "next": "/"})
        assert (await asyncio.to_thread(b.open, "/"))[0] == 303  # still not in
        code, _, page = await asyncio.to_thread(b.open, "/login")
        code, headers, _ = await asyncio.to_thread(b.open, "/login", {
            "csrf": b.csrf(page), "token": token, "next": f"/queue/{qid}"})
        assert code == 303 and headers["Location"] == f"/queue/{qid}"
        code, _, page = await asyncio.to_thread(b.open, f"/queue/{qid}")
        assert code == 200 and 'id="read-only"' not in page
        code, _, _ = await asyncio.to_thread(b.open, f"/queue/{qid}/hold",
                                             {"csrf": b.csrf(page)})
        assert code == 303 and spool.locate(qid) is State.HOLD
        bearer = Browser(base)
        code, _, _ = await asyncio.to_thread(bearer.open, "/", None,
                                             {"Authorization": f"Bearer {token}"})
        assert code == 200
    finally:
        await runner.cleanup()


def _multipart(fields: dict[str, str], name: str, filename: str, content: bytes
               ) -> tuple[bytes, str]:
    boundary = "relayconsoleboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                 f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                 + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


async def test_suppressions_add_import_page_export_remove_and_queue_selection(tmp_path):
    runner, base, spool = await _serve(Guard(host="127.0.0.1"), tmp_path)
    try:
        b = Browser(base)
        page = (await asyncio.to_thread(b.open, "/suppressions"))[2]
        token = b.csrf(page)
        code, headers, _ = await asyncio.to_thread(b.open, "/suppressions/add", {
            "csrf": token, "address": "Someone@Example.COM", "reason": "manual"})
        assert code == 303
        page = (await asyncio.to_thread(b.open, headers["Location"]))[2]
        assert 'data-address="someone@example.com"' in page and "added" in page
        csv = "address,reason\n" + "".join(f"user{i:03}@example.org,bounce\n" for i in range(150))
        body, boundary = _multipart({"csrf": token}, "csv", "list.csv", csv.encode())
        code, _, _ = await asyncio.to_thread(b.post, "/suppressions/import", body,
                                             f"multipart/form-data; boundary={boundary}")
        assert code == 303
        page = (await asyncio.to_thread(b.open, "/suppressions"))[2]
        assert "Imported 150 address(es), 150 new." in page
        assert page.count("<tr data-address=") == 100 and 'id="next-page"' in page
        nxt = html.unescape(re.search(r'id="next-page" href="([^"]+)"', page).group(1))
        page = (await asyncio.to_thread(b.open, nxt))[2]
        assert page.count("<tr data-address=") == 51 and 'id="next-page"' not in page
        export = (await asyncio.to_thread(b.open, "/suppressions.csv"))[2]
        assert export.startswith("address,reason") and len(export.splitlines()) == 152
        code, _, _ = await asyncio.to_thread(b.open, "/suppressions/remove", {
            "csrf": token, "address": "someone@example.com"})
        page = (await asyncio.to_thread(b.open, "/suppressions?q=someone"))[2]
        assert "someone@example.com removed." in page and "<tr data-address=" not in page

        ids = [spool.accept(Envelope("a@x.example", ("b@y.example",), 0.0), b"\r\nm\r\n")
               for _ in range(3)]
        page = (await asyncio.to_thread(b.open, "/queue?state=active"))[2]
        assert all(f'<tr data-qid="{q}"' in page for q in ids)
        body = urllib.parse.urlencode([("csrf", token), ("back", "/queue?state=active"),
                                       ("action", "hold"), ("qid", ids[0]),
                                       ("qid", ids[2])]).encode()
        code, headers, _ = await asyncio.to_thread(b.post, "/queue/actions", body,
                                                   "application/x-www-form-urlencoded")
        assert code == 303 and headers["Location"] == "/queue?state=active"
        assert [spool.locate(q) for q in ids] == [State.HOLD, State.ACTIVE, State.HOLD]
    finally:
        await runner.cleanup()


async def test_pages_say_when_the_database_does_not_answer(tmp_path):
    runner, base, spool = await _serve(Guard(host="127.0.0.1"), tmp_path)
    try:
        (spool.root / "relay.db").unlink()  # a new, empty file: no table answers
        b = Browser(base)
        code, _, page = await asyncio.to_thread(b.open, "/")
        assert code == 200 and "The message log did not answer" in page
        assert '<tr data-state="active">' in page  # the spool's part still shows
        code, _, page = await asyncio.to_thread(b.open, "/log?q=a@b.example")
        assert code == 503 and "The database did not answer: OperationalError" in page
    finally:
        await runner.cleanup()
