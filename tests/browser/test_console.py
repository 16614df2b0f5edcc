"""The console in a real browser (Debian's Chromium driven by Playwright), against a real
relay on the embedded sandbox: the overview's counts, an action from a message's page, a
log search for a bounced address, a hostile HTML body shown inertly, and CSRF refusals."""

from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any

from tests.browser.conftest import Console
from tests.browser.helpers import SIM, Beacon, Client, hostile_html, html_message, queue_ids
from tests.conftest import wait_for
from tests.feedback_helpers import send, suppressed


def count_cell(page: Any, state: str) -> int:
    cell = page.locator(f'#state-counts tr[data-state="{state}"] td.count').first
    return int(re.sub(r"[^0-9]", "", cell.inner_text()) or "-1")


def test_overview_shows_the_count_of_deferred_mail(console: Console, page: Any) -> None:
    response = page.goto(console.url + "/")
    assert response.status == 200
    on_disk = len(queue_ids(console.relay.config, "deferred"))
    assert on_disk >= 1
    assert count_cell(page, "deferred") == on_disk
    for state in ("incoming", "active", "hold", "failed", "corrupt"):
        assert page.locator(f'#state-counts tr[data-state="{state}"]').count() == 1, state
    for part in ("#send-rate", "#reputation", "#paused", "#feedback-lag", "#readiness"):
        assert page.locator(part).count() == 1, part


def test_holding_a_message_from_its_page_moves_it_to_hold(console: Console, page: Any) -> None:
    qid = console.stuck[0]
    page.goto(f"{console.url}/queue/{qid}")
    assert qid in page.locator("body").inner_text()
    with page.expect_navigation():
        page.locator("form.action-hold button").first.click()
    assert urllib.parse.urlsplit(page.url).path == f"/queue/{qid}"
    assert page.locator("#flash").count() == 1
    assert qid in queue_ids(console.relay.config, "hold")
    assert qid not in queue_ids(console.relay.config, "deferred")
    # the overview agrees with the spool
    page.goto(console.url + "/")
    assert count_cell(page, "hold") == len(queue_ids(console.relay.config, "hold"))
    # released from a selection on the queue page, it is sent (the scripted 5xx are used up)
    page.goto(console.url + "/queue?state=hold")
    page.locator(f'input[name="qid"][value="{qid}"]').check()
    with page.expect_navigation():
        page.locator('button[name="action"][value="release"]').first.click()
    assert page.locator("#flash").count() == 1
    assert qid not in queue_ids(console.relay.config, "hold")
    wait_for(lambda: console.relay.find("sent", queue_id=qid), 30)


def test_log_search_finds_a_bounced_address(console: Console, page: Any) -> None:
    bounce = f"bounce@{SIM}"
    qid = send(console.relay.smtp_port, [bounce])
    wait_for(lambda: bounce in suppressed(console.relay.config), 60)
    page.goto(f"{console.url}/log?" + urllib.parse.urlencode({"q": bounce}))
    rows = page.locator("table#log tr.log-row")
    assert rows.count() >= 1
    assert bounce in page.locator("table#log").inner_text()
    page.goto(f"{console.url}/log/{qid}")
    assert page.locator('ol#timeline li[data-event="bounced"]').count() >= 1
    page.goto(f"{console.url}/suppressions?" + urllib.parse.urlencode({"q": bounce}))
    assert page.locator(f'#suppressions tr[data-address="{bounce}"]').count() == 1


def sandbox_id(console: Console, page: Any, subject: str) -> str:
    """The sandbox list's id of the message with this subject, once SES "sent" it."""
    def row() -> str | None:
        page.goto(console.url + "/sandbox")
        found = page.locator("#sandbox-mail tr[data-id]", has_text=subject)
        return found.first.get_attribute("data-id") if found.count() else None
    return str(wait_for(row, 30, interval=0.3))


def test_hostile_html_is_shown_without_running_or_fetching(console: Console, page: Any) -> None:
    subject = f"hostile {time.time_ns()}"
    with Beacon() as beacon:
        send(console.relay.smtp_port, [f"success@{SIM}"],
             html_message(subject, hostile_html(beacon.url)))
        ident = sandbox_id(console, page, subject)
        page.goto(f"{console.url}/sandbox/{ident}")
        frame = page.frame_locator("iframe#html-part")
        frame.locator("#visible").wait_for()  # the HTML part is shown
        page.wait_for_load_state("load")
        sandbox_attr = page.locator("iframe#html-part").get_attribute("sandbox")
        assert sandbox_attr is not None and "allow-scripts" not in sandbox_attr
        assert page.title() != "PWNED"
        assert len(page.frames) >= 2
        for f in page.frames:
            assert f.evaluate("() => [window.relayPwned, document.title]")[0] is None, f.url
            assert f.evaluate("() => document.title") != "PWNED", f.url
        # opened on its own (a new tab on the frame's address), it is just as inert
        page.goto(f"{console.url}/sandbox/{ident}/html")
        page.locator("#visible").wait_for()
        assert page.evaluate("() => window.relayPwned") is None
        assert page.title() != "PWNED"
        # every request the body makes would have arrived by its load event
        assert beacon.hits == []
    status, headers, _ = Client(console.url).request(f"/sandbox/{ident}/html")
    assert status == 200
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_an_action_without_the_csrf_token_is_refused(console: Console, page: Any) -> None:
    qid = console.stuck[1]
    page.goto(f"{console.url}/queue/{qid}")
    page.evaluate("() => document.querySelectorAll('form.action-hold input[name=csrf]')"
                  ".forEach(e => e.remove())")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.locator("form.action-hold button").first.click()
    assert posted.value.status == 403
    page.wait_for_load_state()
    assert "csrf" in page.locator("body").inner_text().lower()
    assert qid in queue_ids(console.relay.config, "deferred")

    client = Client(console.url)
    # no cookie, no field
    assert client.request(f"/queue/{qid}/hold", {})[0] == 403
    token = client.csrf_field(f"/queue/{qid}")  # the cookie is in the jar now
    # the cookie without the field, a wrong field, and the right pair from another site
    assert client.request(f"/queue/{qid}/hold", {})[0] == 403
    assert client.request(f"/queue/{qid}/hold", {"csrf": token + "x"})[0] == 403
    assert client.request(f"/queue/{qid}/hold", {"csrf": token},
                          {"Origin": "http://evil.example"})[0] == 403
    assert qid in queue_ids(console.relay.config, "deferred")
    # and the right pair from the console itself acts
    status, headers, _ = client.request(f"/queue/{qid}/hold", {"csrf": token},
                                        {"Origin": console.url})
    assert status == 303, status
    assert urllib.parse.urlsplit(headers["Location"]).path == f"/queue/{qid}"
    assert qid in queue_ids(console.relay.config, "hold")
