"""Screenshots of every console page as a new user sees them after the quick start.

Starts a relay on the embedded sandbox (admin listener on 127.0.0.1, an ephemeral port),
sends a few messages (a normal one, a bounce, a complaint, one with an HTML part, and one
that the sandbox answers with a 5xx so it waits in deferred/), waits until the simulator's
feedback is applied, and saves a full-page PNG of each page with headless Chromium.

    .venv/bin/python -m tests.browser.screenshots OUTPUT_DIR
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.conftest import console_sections, launch
from tests.browser.helpers import SIM, html_message, queue_ids
from tests.conftest import RelayProcess, wait_for
from tests.feedback_helpers import mime, send, suppressed

HTML = """<html><body style="font-family: sans-serif">
<h1 style="color:#235">Your order has shipped</h1>
<p>Hello Ada, parcel <b>RL-2291</b> is on its way.</p>
<img src="https://tracker.example/pixel.gif" alt="(a remote image, blocked)">
<script>document.body.innerHTML = "script ran";</script></body></html>"""


def take(out: Path, relay: RelayProcess) -> list[Path]:
    base = f"http://127.0.0.1:{relay.admin_port}"
    stuck = send(relay.smtp_port, ["late@example.net"], mime("waiting for SES"))
    wait_for(lambda: stuck in queue_ids(relay.config, "deferred"), 30)
    send(relay.smtp_port, [f"success@{SIM}"], mime("welcome aboard"))
    bounced = send(relay.smtp_port, [f"bounce@{SIM}"], mime("password reset"))
    send(relay.smtp_port, [f"complaint@{SIM}"], mime("weekly digest"))
    send(relay.smtp_port, [f"success@{SIM}"], html_message("Your order has shipped", HTML))
    wait_for(lambda: {f"bounce@{SIM}", f"complaint@{SIM}"} <= set(suppressed(relay.config)),
             60, interval=0.5)
    pages: list[tuple[str, str]] = [
        ("01-overview", "/"),
        ("02-queue", "/queue"),
        ("03-queue-deferred", "/queue?state=deferred"),
        ("04-message", f"/queue/{stuck}"),
        ("05-log-search", "/log?" + urllib.parse.urlencode({"q": f"bounce@{SIM}"})),
        ("06-timeline", f"/log/{bounced}"),
        ("07-suppressions", "/suppressions"),
        ("08-sandbox", "/sandbox"),
    ]
    saved = []
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    try:
        with sync_playwright() as pw:
            context = launch(pw, profile)
            page = context.new_page()
            for name, path in pages:
                page.goto(base + path)
                saved.append(out / f"{name}.png")
                page.screenshot(path=saved[-1], full_page=True)
            row = page.locator("#sandbox-mail tr[data-id]", has_text="Your order has shipped")
            ident = row.first.get_attribute("data-id")
            page.goto(f"{base}/sandbox/{ident}")
            page.frame_locator("iframe#html-part").locator("h1").wait_for()
            saved.append(out / "09-sandbox-message.png")
            page.screenshot(path=saved[-1], full_page=True)
            # an action: hold the deferred message from its page
            page.goto(f"{base}/queue/{stuck}")
            with page.expect_navigation():
                page.locator("form.action-hold button").first.click()
            saved.append(out / "10-after-hold.png")
            page.screenshot(path=saved[-1], full_page=True)
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return saved


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.browser.screenshots OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="relay-screenshots-"))
    relay = RelayProcess(work, console_sections(work, sandbox={"faults": ["5xx"]}))
    try:
        relay.start()
        for path in take(out, relay):
            print(path)
    finally:
        relay.stop()
        relay.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
