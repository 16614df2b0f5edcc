"""The console's views print hostile input as text: a <script> in a subject, an address, a
header, a last error, a lane, a suppression's detail or a feedback event never reaches
the page as markup."""

from __future__ import annotations

import pytest

from relay.delivery.ports import Account
from relay.ops.console import sandbox, views_log, views_overview, views_queue
from relay.ops.console.data import Counts, Filter, QueuePage
from relay.ops.console.html import Markup, esc, h, page
from relay.ops.console.sources import Line, Status
from relay.store.lookup import Event, Row, Suppressed, search_terms
from relay.store.suppression import Entry

EVIL = '<script>alert("x")</script>'
SAFE = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"


def clean(html: str) -> None:
    assert "<script" not in html.lower()
    assert SAFE in html


def test_escape_helpers_escape_arguments_but_not_markup():
    assert esc(EVIL) == SAFE
    assert h("<b>{}</b>", EVIL) == f"<b>{SAFE}</b>"
    assert h("<b>{}</b>", Markup("<i>ok</i>")) == "<b><i>ok</i></b>"
    assert Markup("<b>") + EVIL == f"<b>{SAFE}" and isinstance(Markup("") + "x", Markup)
    assert esc('" onmouseover="x') == "&quot; onmouseover=&quot;x"


def _doc(**over):
    doc = {"id": "0005F2C3A1B2C3D4E5", "state": "deferred", "age": 30.0, "size": 10,
           "sender": EVIL, "recipients": 1, "pending": 1, "attempts": 2, "lane": EVIL,
           "next_attempt": 100.0, "last_error": EVIL,
           "envelope": {"sender": EVIL, "recipients": [f"{EVIL}@example.com"],
                        "received_at": 1.0, "client": EVIL, "helo": EVIL, "lane": EVIL,
                        "ses": {"configuration_set": EVIL, "tags": [[EVIL, EVIL]]}},
           "results": {f"{EVIL}@example.com": {"status": EVIL, "ses_message_id": EVIL,
                                               "reason": EVIL, "at": 1.0}},
           "raw_headers": f"Subject: {EVIL}\nX-Evil: {EVIL}"}
    doc.update(over)
    return doc


def test_queue_list_escapes_every_field():
    pg = QueuePage([_doc()], next_after=EVIL)
    out = views_queue.queue(pg, Filter(sender=EVIL, domain=EVIL, error=EVIL, lane=EVIL),
                            csrf=EVIL, lanes=(EVIL,), min_age=EVIL, now=0.0, read_only=False)
    clean(out)
    assert 'id="queue"' in out and 'data-qid="0005F2C3A1B2C3D4E5"' in out


def test_message_page_escapes_envelope_results_headers_and_error():
    out = views_queue.message(_doc(), csrf=EVIL, now=0.0, read_only=False)
    clean(out)
    assert 'id="recipients"' in out and 'id="headers"' in out and 'id="raw"' in out
    for verb in ("retry", "hold", "requeue", "delete"):
        assert f'class="action-{verb}"' in out
    assert 'class="action-release"' not in out  # deferred mail is not held


def test_read_only_disables_the_buttons():
    out = views_queue.message(_doc(), csrf="t", now=0.0, read_only=True)
    assert out.count(" disabled>") == 4


def test_log_timeline_and_suppressions_escape():
    row = Row(EVIL, EVIL, EVIL, EVIL, EVIL, 1, EVIL, 1.0, 2.0, 1.5)
    event = Event("bounce", EVIL, EVIL, EVIL, 3.0, 4.0)
    clean(views_log.log(EVIL, [row]))
    clean(views_log.timeline(EVIL, [row], [event]))
    sup = Suppressed(Entry(EVIL, EVIL, EVIL, EVIL, 1.0, 1.0), event)
    out = views_log.suppressions(EVIL, [sup], csrf=EVIL, read_only=False, next_after=EVIL)
    clean(out)
    assert 'id="suppressions"' in out


def test_overview_escapes_reasons_lanes_and_problems():
    status = Status(paused=True, paused_reason=EVIL, holds=(EVIL,),
                    account=Account(14.0, 1000.0, 10.0, True), configured_rate=14.0,
                    reputation=(Line("", 100, 0.01, 0, 0.04, 0.0008), Line(EVIL, 5, 0, 0, 1, 1,
                                                                        paused=EVIL)),
                    lanes=(EVIL,))
    counts = Counts({"active": 3}, {EVIL: {"active": 3}}, False, 60.0, "0005F2C3A1B2C3D4E5")
    out = views_overview.overview(counts=counts, status=status, per_minute=[0] * 59 + [120],
                                  problems=[EVIL], latest=Event(EVIL, EVIL, EVIL, EVIL, 1, 2),
                                  now=10.0)
    clean(out)
    for mark in ('id="state-counts"', 'data-state="active"', '<td class="count">3</td>',
                 'id="send-rate"', 'id="reputation"', 'id="paused"', 'id="feedback-lag"',
                 'id="readiness"', 'tr data-lane="account"'):
        assert mark in out


def test_sandbox_views_escape_and_keep_the_html_in_the_frame():
    sent = sandbox.Sent("0" * 16 + "-" + "a" * 36 + "-000000", 1.0, EVIL, EVIL, EVIL)
    clean(sandbox.outbox_page([sent], {sent.id: [Event("bounce", EVIL, "", "", 1, 1)]}, ""))
    shown = sandbox.Shown(sent.id, f"Subject: {EVIL}", EVIL, f"<p>{EVIL}</p>")
    out = sandbox.message_page(shown, [])
    clean(out)
    assert f'<iframe id="html-part" sandbox src="/sandbox/{sent.id}/html"' in out


def test_page_escapes_title_user_and_flash():
    out = page(EVIL, Markup("<p>body</p>"), flash=EVIL, user=EVIL)
    clean(out)
    assert '<p id="flash" role="status">' in out


@pytest.mark.parametrize("q, terms", [
    ("", {}),
    ("Bob@Example.COM", {"recipient": "bob@example.com", "message_id_header": "<Bob@Example.COM>"}),
    ("<abc@host>", {"message_id_header": "<abc@host>"}),
    ("0005f2c3a1b2c3d4e5", {"ses_message_id": "0005f2c3a1b2c3d4e5",
                            "queue_id": "0005F2C3A1B2C3D4E5"}),
])
def test_a_search_term_is_looked_up_where_it_can_be(q, terms):
    assert search_terms(q) == terms


def test_timeline_orders_queue_send_and_feedback():
    row = Row("Q", "a@x.org", "<m@x>", "SES1", "bounced", 1, "", 1.0, 9.0, 2.0)
    steps = views_log.timeline_steps([row], [Event("bounce", "a@x.org", "SES1", "5.1.1", 3.0,
                                                   4.0)])
    assert [s.event for s in steps] == ["queued", "attempt", "sent", "bounced"]


def test_rate_chart_draws_a_bar_per_minute_and_the_account_line():
    svg = views_overview.rate_chart([60] * 60, 14.0)
    assert svg.count('class="bar"') == 60
    assert 'class="limit"' in svg and "account 14 /s" in svg


def test_reputation_reads_the_account_wide_guard():
    from types import SimpleNamespace as NS

    from relay.ops.console.sources import reputation_of

    # the shape of relay.feedback.guard.ReputationGuard before per-lane rates
    rates = NS(sent=400, bounces=80, complaints=1, bounce_rate=0.2, complaint_rate=0.0025)
    guard = NS(last=rates, max_bounce_rate=0.04,
               max_complaint_rate=0.0008, min_sample=200,
               paused_reason=lambda: "reputation: bounce rate 0.2 above 0.04")
    [line] = reputation_of(guard)
    assert (line.lane, line.sent, line.bounce_rate, line.max_bounce_rate, line.min_sample) == (
        "", 400, 0.2, 0.04, 200)
    assert line.paused.startswith("reputation:")


def test_reputation_reads_a_per_lane_guard_account_first():
    from types import SimpleNamespace as NS

    from relay.ops.console.sources import reputation_of

    def scope(judged, bounces, paused=""):
        return NS(counts=NS(judged=judged, bounces=bounces, complaints=0, unknown=3,
                            bounce_rate=bounces / judged, complaint_rate=0.0),
                  lines=NS(bounce=0.05, complaint=0.001), paused=paused)

    guard = NS(scopes={"bulk": scope(100, 20, "reputation: lane bulk"),
                       "transactional": scope(50, 0), "*": scope(150, 20)})
    lines = reputation_of(guard)
    assert [ln.lane for ln in lines] == ["", "bulk", "transactional"]
    assert lines[1].paused == "reputation: lane bulk" and lines[1].bounce_rate == 0.2
    out = views_overview.reputation(lines)
    assert 'tr data-lane="bulk"' in out and "3 send(s) awaiting their outcome" in out
