"""Fixtures for the console's browser tests: one relay on the embedded sandbox per module,
with its admin listener on 127.0.0.1, and one headless Debian Chromium per module driven by
Playwright (never a browser Playwright downloads: /usr/bin/chromium, which tests/run.sh
installs). Every process started here is stopped at teardown; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RelayProcess, relay_sections

CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")

#: Chromium's switches for a quiet, local-only headless run (no update checks, no sync,
#: no QUIC probing: the browser talks to the relay on loopback and nothing else)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

#: the first two SendEmail calls fail with a 5xx: the first two messages a module sends
#: wait in deferred/ for an hour, so a test has queued mail that stays queued
STUCK = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives Chromium against the console")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(pytest.mark.browser)


def chromium_or_skip() -> str:
    """The Chromium binary; outside CI a machine without it skips (tests/run.sh installs it)."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    reason = f"{CHROMIUM} is missing: tests/run.sh installs Debian's chromium"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def launch(pw: Any, user_data_dir: str) -> Any:
    """A headless Chromium context with a fresh profile in user_data_dir."""
    return pw.chromium.launch_persistent_context(
        user_data_dir, executable_path=chromium_or_skip(), headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
    )


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    """One Chromium per module (a persistent context: a fresh profile directory)."""
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    pw = sync_playwright().start()
    try:
        context = launch(pw, profile)
        try:
            yield context
        finally:
            context.close()
    finally:
        pw.stop()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """A new tab for each test; its cookies (the CSRF cookie) belong to the module's profile."""
    tab = browser_context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    tab.close()


def console_sections(tmp: Path, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A relay on the embedded sandbox whose first STUCK messages stay deferred for an hour;
    the feedback of the sandbox's mailbox simulator is read every second."""
    sections = relay_sections(
        tmp, "sandbox",
        smtp={"workers": 1},
        delivery={"min_backoff": "1h", "max_backoff": "1h"},
        sandbox={"faults": ["5xx"] * STUCK},
        feedback={"wait_time": "1s"},
    )
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


@pytest.fixture(scope="module")
def console_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp = tmp_path_factory.mktemp("console")
    relay = RelayProcess(tmp, console_sections(tmp))
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
        relay.kill()


class Console:
    """The module's relay, its console's base URL, and the messages stuck in deferred/."""

    def __init__(self, relay: RelayProcess, stuck: list[str]) -> None:
        self.relay = relay
        self.url = f"http://127.0.0.1:{relay.admin_port}"
        self.stuck = stuck


@pytest.fixture(scope="module")
def console(console_relay: RelayProcess) -> Console:
    """The relay with STUCK messages deferred for an hour (each took one scripted 5xx)."""
    from tests.browser.helpers import queue_ids
    from tests.conftest import wait_for
    from tests.feedback_helpers import mime, send

    stuck = [send(console_relay.smtp_port, [f"stuck{n}@example.net"], mime(f"stuck {n}"))
             for n in range(STUCK)]
    wait_for(lambda: set(stuck) <= set(queue_ids(console_relay.config, "deferred")), 30)
    return Console(console_relay, stuck)
