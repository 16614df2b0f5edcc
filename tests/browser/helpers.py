"""Helpers for the browser tests and the screenshot script: messages to send (plain and
hostile HTML), the queue as `relay queue list --json` shows it, a local HTTP server that
counts the requests a page should never make, and plain urllib calls to the console."""

from __future__ import annotations

import http.cookiejar
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.feedback_helpers import SENDER, cli

SIM = "simulator.amazonses.com"


def queue_ids(config: Path, state: str) -> list[str]:
    """Queue ids in a state, read by the relay's own CLI (not by spool path)."""
    out = cli(config, "queue", "list", "--state", state, "--json").stdout
    return [json.loads(line)["id"] for line in out.splitlines() if line.strip()]


def html_message(subject: str, html: str, *, text: str = "plain part") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"App <{SENDER}>"
    msg["To"] = f"success@{SIM}"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{re.sub(r'[^a-z0-9]', '', subject.lower())}@example.com>"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return bytes(msg)


def hostile_html(beacon: str) -> str:
    """An HTML part that would mark every frame it runs in, change the title, call home,
    and load a remote image: shown safely, none of that happens."""
    return f"""<html><head><title>hostile</title>
<link rel="stylesheet" href="{beacon}/style.css"></head>
<body><p id="visible">Quarterly report: figures inside</p>
<img src="{beacon}/beacon.gif" alt="tracking pixel">
<script>
window.relayPwned = 1; document.title = "PWNED";
try {{ top.relayPwned = 1; top.document.title = "PWNED"; }} catch (e) {{}}
fetch("{beacon}/fetch");
</script></body></html>"""


class Beacon:
    """An HTTP server on 127.0.0.1 that counts every request it gets (paths kept)."""

    def __init__(self) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Beacon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class Client:
    """A plain HTTP client (urllib) with its own cookie jar, never following a redirect."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect())

    def request(self, path: str, data: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), exc.read().decode(errors="replace")

    def csrf_field(self, path: str) -> str:
        """The hidden csrf field of the first form on a page (its cookie lands in the jar)."""
        status, _, page = self.request(path)
        assert status == 200, (path, status, page[:500])
        m = re.search(r'<input[^>]*name="csrf"[^>]*>', page)
        assert m, f"no csrf field on {path}"
        value = re.search(r'value="([^"]*)"', m.group(0))
        assert value, m.group(0)
        return value.group(1)
