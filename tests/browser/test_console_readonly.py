"""With admin.host not on loopback and no console login configured, the console is
read-only: pages render with a banner naming the keys to set, every action is refused.

Servers in tests bind loopback only, so the non-loopback address lives in a private network
namespace made here: the namespace's own `lo` carries 127.0.0.1 and 10.213.0.1, the relay
(admin listener on 10.213.0.1) and the browser both run inside it, and nothing can reach
the address from outside the namespace, let alone the machine. Needs root; skipped if not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import netns
from tests.browser.conftest import chromium_or_skip, console_sections
from tests.browser.helpers import queue_ids
from tests.conftest import ROOT, RelayProcess, wait_for

ADDRESS = "10.213.0.1"


@pytest.fixture
def namespace() -> Iterator[str]:
    why = netns.available()
    if why:
        pytest.skip(why)
    chromium_or_skip()
    with netns.namespace(ADDRESS) as name:
        yield name


def in_namespace(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.browser.netns", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=netns.enter(name))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_non_loopback_admin_without_login_refuses_actions(
        namespace: str, tmp_path: Path) -> None:
    sections = console_sections(tmp_path, admin={"host": ADDRESS, "port": 0})
    relay = RelayProcess(tmp_path, sections, preexec=netns.enter(namespace))
    try:
        relay.start()
        url = f"http://{ADDRESS}:{relay.admin_port}"
        qid = in_namespace(namespace, "send", str(relay.smtp_port))
        wait_for(lambda: qid in queue_ids(relay.config, "deferred"), 30)
        seen = json.loads(in_namespace(namespace, "browse", url, qid))
    finally:
        relay.stop()
        relay.kill()
    assert seen["healthz"] == 200 and seen["metrics"] == 200
    assert seen["overview"] == 200 and seen["message_page_has_qid"]
    assert "read-only" in seen["banner"].lower()
    assert "admin.console_token" in seen["banner"]
    assert seen["browser_post"] == 403
    assert seen["urllib_post"] == 403, seen["urllib_body"]
    assert "read-only" in seen["urllib_body"].lower(), seen["urllib_body"]
    assert qid in queue_ids(relay.config, "deferred")
    assert qid not in queue_ids(relay.config, "hold")
