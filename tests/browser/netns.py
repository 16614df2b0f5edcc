"""A private network namespace for a test that needs a non-loopback address: its own `lo`
carries 127.0.0.1 and one 10.x address, so a server bound there is reachable from inside
the namespace only and nothing leaves the machine. Needs root (`ip netns add`).

Also a command-line client that runs inside the namespace (started with the namespace's
preexec): `python -m tests.browser.netns send PORT` sends one message and prints its queue
id; `python -m tests.browser.netns browse URL QID [PNG]` opens the console in Chromium (the
overview saved as PNG if given), tries to hold QID from its page and by a plain POST with
a valid CSRF pair, and prints JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000


def available() -> str:
    """"" when this process can make a namespace, else why not."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip to create a network namespace"
    return ""


@contextmanager
def namespace(address: str) -> Iterator[str]:
    """A named namespace with lo up and `address`/32 on lo; deleted at exit."""
    name = f"relay-console-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{address}/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def enter(name: str) -> Callable[[], None]:
    """A preexec_fn that moves the child into the namespace before it runs anything."""
    path = f"/run/netns/{name}"

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
        finally:
            os.close(fd)
    return preexec


def browse(url: str, qid: str, shot: str = "") -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import launch
    from tests.browser.helpers import Client

    result: dict[str, object] = {}
    client = Client(url)
    result["healthz"] = client.request("/healthz")[0]
    result["metrics"] = client.request("/metrics")[0]
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    try:
        with sync_playwright() as pw:
            context = launch(pw, profile)
            page = context.new_page()
            page.set_default_timeout(20_000)
            result["overview"] = page.goto(url + "/").status
            banner = page.locator("#read-only")
            result["banner"] = banner.inner_text() if banner.count() else ""
            if shot:
                page.screenshot(path=shot, full_page=True)
            page.goto(f"{url}/queue/{qid}")
            result["message_page_has_qid"] = qid in page.locator("body").inner_text()
            button = page.locator("form.action-hold button").first
            result["button_disabled"] = button.is_disabled()
            # a page that is read-only may disable its buttons: enable one, as a
            # determined user could, and the server must still refuse the POST
            page.evaluate("() => document.querySelectorAll('form.action-hold button')"
                          ".forEach(b => b.disabled = false)")
            with page.expect_response(lambda r: r.request.method == "POST") as posted:
                button.click()
            result["browser_post"] = posted.value.status
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    status, _, page_text = client.request(f"/queue/{qid}")
    token = ""
    if 'name="csrf"' in page_text:
        token = client.csrf_field(f"/queue/{qid}")
    status, _, body = client.request(f"/queue/{qid}/hold", {"csrf": token}, {"Origin": url})
    result["urllib_post"] = status
    result["urllib_body"] = body[:500]
    return result


def main(argv: list[str]) -> int:
    if argv[0] == "send":
        from tests.feedback_helpers import mime, send

        print(send(int(argv[1]), ["readonly@example.net"], mime("read-only console")))
    elif argv[0] == "browse":
        print(json.dumps(browse(*argv[1:4])))
    else:
        print(f"unknown command {argv[0]!r}: send PORT | browse URL QID [PNG]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
