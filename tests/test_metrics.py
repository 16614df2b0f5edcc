"""/metrics scraped from a running relay; /readyz follows the pool's pause; the SMTP
counters fed by the in-process ingress through its SessionObserver hook."""

from __future__ import annotations

import smtplib
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from relay.ops.metrics import Metrics, call_outcome
from relay.sandbox.server import SandboxState, SandboxThread
from tests.conftest import RelayProcess, wait_for
from tests.ingress_server import Raw
from tests.test_spine import SENDER, message, send

SIM = "simulator.amazonses.com"


def get(relay: RelayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(relay: RelayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(relay, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def test_metrics_carry_every_series(start_relay):
    state = SandboxState(max_send_rate=100)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        state.script("5xx")
        send(relay.smtp_port, ["a@example.net"], message("one"))
        send(relay.smtp_port, ["b@example.net", "c@example.net"], message("two"))
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
            s.ehlo("client.example")
            s.mail(SENDER)
            code, _ = s.rcpt("not-an-address")
            assert code >= 500
        wait_for(lambda: state.recipients_sent() == 3, 20)
        wait_for(lambda: not relay.queued("active") and not relay.queued("deferred"), 10)
        m = wait_for(lambda: (lambda x: x if value(x, "relay_recipients_sent_total") == 3
                              else None)(scrape(relay)), 10)

        assert value(m, "relay_smtp_sessions_total") == 3
        assert value(m, "relay_smtp_replies_total", code="220") == 3
        assert value(m, "relay_smtp_replies_total", code="250") >= 8
        assert sum(v for (n, lab), v in m.items()
                   if n == "relay_smtp_replies_total" and lab[0][1].startswith("5")) >= 1
        assert value(m, "relay_messages_accepted_total") == 2
        assert value(m, "relay_ses_calls_total", outcome="ok") == 2
        assert value(m, "relay_ses_calls_total", outcome="transient") == 1
        assert value(m, "relay_ses_calls_total", outcome="throttled") == 0
        assert value(m, "relay_ses_call_seconds_count") == 3
        assert value(m, "relay_ses_call_seconds_bucket", le="+Inf") == 3
        assert value(m, "relay_recipients_total", outcome="sent") == 3
        assert value(m, "relay_recipients_total", outcome="deferred") == 1
        for st in ("active", "deferred", "hold", "failed", "corrupt"):
            assert value(m, "relay_spool_messages", state=st) == 0
            assert value(m, "relay_spool_oldest_age_seconds", state=st) == 0
        assert value(m, "relay_send_rate_configured") == 100
        assert 0 < value(m, "relay_send_rate") <= 100
        assert value(m, "relay_paused") == 0
        assert value(m, "relay_feedback_events", type="bounce") == 0
        assert value(m, "relay_suppressed_recipients_total") == 0
        assert value(m, "relay_suppressions") == 0


def test_feedback_events_and_suppressions_from_the_simulator(start_relay):
    state = SandboxState(max_send_rate=1000, max_24hour_send=-1)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, feedback={"sqs_queue_url": f"{sb.url}/queue/feedback",
                                              "sqs_endpoint_url": sb.url, "wait_time": "1s"})
        send(relay.smtp_port, [f"bounce@{SIM}", f"complaint@{SIM}", f"success@{SIM}"],
             message("feedback"))

        def settled() -> dict | None:
            m = scrape(relay)
            done = (value(m, "relay_suppressions") == 2
                    and value(m, "relay_feedback_events", type="complaint") == 1)
            return m if done else None

        m = wait_for(settled, 30)
        assert value(m, "relay_feedback_events", type="bounce") == 1
        assert value(m, "relay_feedback_events", type="delivery") >= 1
        assert value(m, "relay_feedback_state", name="feedback_applied") >= 2
        # a later message to a suppressed address is dropped at delivery time
        send(relay.smtp_port, [f"bounce@{SIM}"], message("again"))
        wait_for(lambda: value(scrape(relay), "relay_suppressed_recipients_total") == 1, 20)
        assert value(scrape(relay), "relay_recipients_total", outcome="suppressed") == 1
        assert relay.find("suppressed")


def test_readyz_not_ready_while_paused_and_spool_gauges(start_relay):
    state = SandboxState(max_send_rate=100, sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        assert get(relay, "/healthz") == (200, "ok\n")
        status, text = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(
            get(relay, "/readyz")), 10)
        assert "paused" in text and "SendingEnabled=false" in text
        send(relay.smtp_port, ["a@example.net"], message("waits"))
        m = scrape(relay)
        assert value(m, "relay_paused") == 1
        assert value(m, "relay_spool_messages", state="active") == 1
        assert value(m, "relay_spool_oldest_age_seconds", state="active") > 0

        state.sending_enabled = True
        wait_for(lambda: get(relay, "/readyz") == (200, "ready\n"), 10)
        wait_for(lambda: state.accepted(), 10)
        wait_for(lambda: value(scrape(relay), "relay_paused") == 0, 10)


def test_call_outcome_labels():
    assert [call_outcome(e) for e in (None, ThrottledError("T"), TransientError("X"),
                                      PermanentError("P"), ConfigurationError("C"),
                                      AccountPausedError("A"), RuntimeError())] == [
        "ok", "throttled", "transient", "permanent", "configuration", "paused", "error"]


def test_sessions_and_replies_are_counted_through_the_session_observer(ingress):
    metrics = Metrics()
    server = ingress(max_connections_per_client=1, ingress_kw={"observer": metrics})

    def count(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    with Raw(server.port) as c:
        assert c.reply().startswith(b"220")
        # a connection refused by a cap was still opened, as before the hook existed
        with Raw(server.port) as refused:
            assert refused.reply().startswith(b"421 4.7.0")
        ehlo = c.cmd(b"EHLO client.example")
        assert c.cmd(b"MAIL FROM:<app@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<not-an-address>").startswith(b"553")
        assert c.cmd(b"RCPT TO:<a@example.net>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"From: app@example.com\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        assert c.cmd(b"QUIT").startswith(b"221")
    wait_for(lambda: count("relay_smtp_replies_total", code="221") == 1, 10)
    assert count("relay_smtp_sessions_total") == 2
    assert count("relay_smtp_replies_total", code="220") == 1
    # each line of the EHLO reply, MAIL, the good RCPT, the 250 after the final dot
    assert count("relay_smtp_replies_total", code="250") == len(ehlo.splitlines()) + 3
    assert count("relay_smtp_replies_total", code="553") == 1
    assert count("relay_smtp_replies_total", code="354") == 1
