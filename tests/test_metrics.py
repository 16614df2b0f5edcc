"""/metrics scraped from a running relay; /readyz follows the pool's pause; the SMTP
counters fed by the in-process ingress through its SessionObserver hook."""

from __future__ import annotations

import asyncio
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
from relay.ops.metrics import RECIPIENT_OUTCOMES, Metrics, call_outcome
from relay.ops.metrics_scrape import feedback_families, merge_processes
from relay.sandbox.server import SandboxState, SandboxThread
from relay.spool.record import partition
from tests.conftest import RelayProcess, relay_sections, wait_for
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


UNITS = ("_seconds", "_bytes", "_ratio", "_per_second")


def naming_problems(text: str) -> list[str]:
    """Prometheus' naming rules, as far as a rule can see them."""
    problems = []
    for family in text_string_to_metric_families(text):
        name = family.name
        if name.endswith("_created"):  # a counter's creation time, as the client writes it
            continue
        if family.type == "gauge" and name.endswith(("_total", "_count", "_sum")):
            problems.append(f"{name}: a gauge named like a counter")
        if any("name" in s.labels for s in family.samples):
            problems.append(f"{name}: a label that names what the value means")
        if any(w in name.split("_") for w in ("rate", "age", "delay", "latency", "time")) \
                and not name.endswith(UNITS):
            problems.append(f"{name}: no unit")
    return problems


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
        assert naming_problems(get(relay, "/metrics")[1]) == []

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
        assert value(m, "relay_configured_send_rate_recipients_per_second") == 100
        assert 0 < value(m, "relay_send_rate_recipients_per_second") <= 100
        assert value(m, "relay_paused") == 0
        assert value(m, "relay_feedback_events_stored", type="bounce") == 0
        assert value(m, "relay_suppressed_recipients_total") == 0
        assert value(m, "relay_suppressions") == 0
        # no feedback ingester here: its numbers are still there, at 0
        assert value(m, "relay_feedback_messages_total", outcome="applied") == 0
        assert value(m, "relay_reputation_bounce_ratio") == 0
        # the process itself
        assert value(m, "process_cpu_seconds_total") > 0
        assert value(m, "process_resident_memory_bytes") > 0
        assert value(m, "process_open_fds") > 0


def test_feedback_events_and_suppressions_from_the_simulator(start_relay):
    state = SandboxState(max_send_rate=1000, max_24hour_send=-1, raw_delivery=True)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, feedback={"sqs_queue_url": f"{sb.url}/queue/feedback",
                                              "sqs_endpoint_url": sb.url, "raw_delivery": True,
                                              "wait_time": "1s"})
        send(relay.smtp_port, [f"bounce@{SIM}", f"complaint@{SIM}", f"success@{SIM}"],
             message("feedback"))

        def settled() -> dict | None:
            m = scrape(relay)
            done = (value(m, "relay_suppressions") == 2
                    and value(m, "relay_feedback_events_stored", type="complaint") == 1)
            return m if done else None

        m = wait_for(settled, 30)
        assert value(m, "relay_feedback_events_stored", type="bounce") == 1
        assert value(m, "relay_feedback_events_stored", type="delivery") >= 1
        assert value(m, "relay_feedback_messages_total", outcome="applied") >= 2
        assert value(m, "relay_feedback_messages_total", outcome="unparseable") == 0
        assert value(m, "relay_reputation_sample_sends") >= 0
        # the feedback path's own signals: events applied by kind, lag from SES's
        # timestamp (the sandbox stamps the event when it accepts the call), the backlog
        assert value(m, "relay_feedback_events_applied_total", kind="bounce") == 1
        assert value(m, "relay_feedback_events_applied_total", kind="complaint") == 1
        assert 0 <= value(m, "relay_feedback_lag_seconds", quantile="0.5") < 30
        assert 0 < value(m, "relay_feedback_lag_seconds", quantile="0.99") < 30
        assert value(m, "relay_feedback_backlog_messages") >= -1
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

    async def scrape() -> None:
        metrics.flush()  # as /metrics does, on the loop the sessions count on

    def count(name: str, **labels: str) -> float:
        asyncio.run_coroutine_threadsafe(scrape(), server.loop).result(10)
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


def test_naming_rules_catch_what_the_old_names_did_wrong():
    old = ("# TYPE relay_send_rate gauge\nrelay_send_rate 14.0\n"
           "# TYPE relay_feedback_state gauge\nrelay_feedback_state{name=\"x\"} 1.0\n"
           "# TYPE relay_sent_total gauge\nrelay_sent_total 1.0\n")
    assert [p.split(":")[0] for p in naming_problems(old)] == [
        "relay_send_rate", "relay_feedback_state", "relay_sent_total"]


def test_every_label_value_is_exposed_before_it_is_seen():
    metrics = Metrics(lanes=("transactional", "bulk"))
    text = metrics.render().decode()

    def count(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    for outcome in RECIPIENT_OUTCOMES:
        assert count("relay_recipients_total", outcome=outcome) == 0
        for lane in ("transactional", "bulk"):
            assert count("relay_lane_recipients_total", lane=lane, outcome=outcome) == 0
    for lane in ("transactional", "bulk"):
        assert count("relay_lane_messages_queued_total", lane=lane) == 0
        assert count("relay_lane_queue_delay_seconds_count", lane=lane) == 0
    for outcome in ("ok", "throttled", "transient", "permanent", "paused", "error"):
        assert count("relay_ses_calls_total", outcome=outcome) == 0
    for code in ("220", "250", "421", "451", "452", "550", "553", "554"):
        assert count("relay_smtp_replies_total", code=code) == 0
    assert "process_cpu_seconds_total" in text


def test_feedback_numbers_get_one_metric_each_and_zero_when_absent():
    def values(stats: dict[str, float]) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(s.labels.items())): s.value
                for f in feedback_families(stats) for s in f.samples}

    full = values({"feedback_applied": 5, "feedback_errors": 1, "sns_rejected": 2,
                   "bounce_rate": 0.05, "complaint_rate": 0.001, "reputation_sample": 400,
                   "reputation_paused": 1.0, "feedback_rejected": 3, "feedback_too_old": 4,
                   "feedback_kind_bounce": 6, "feedback_kind_delivery": 7,
                   "feedback_lag_p50": 0.5, "feedback_lag_p99": 1.5, "feedback_backlog": 8,
                   "sns_unparseable": 9, "ses_paused": 1.0})
    kinds = ("bounce", "soft-bounce", "complaint", "delivery", "delay", "reject",
             "rendering-failure", "send")
    assert full == {
        ("relay_feedback_messages_total", (("outcome", "applied"),)): 5,
        ("relay_feedback_messages_total", (("outcome", "duplicate"),)): 0,
        ("relay_feedback_messages_total", (("outcome", "ignored"),)): 0,
        ("relay_feedback_messages_total", (("outcome", "unparseable"),)): 0,
        ("relay_feedback_messages_total", (("outcome", "rejected"),)): 3,
        ("relay_feedback_messages_total", (("outcome", "too_old"),)): 4,
        ("relay_feedback_messages_total", (("outcome", "errors"),)): 1,
        **{("relay_feedback_events_applied_total", (("kind", k),)):
           {"bounce": 6, "delivery": 7}.get(k, 0) for k in kinds},
        ("relay_feedback_lag_seconds", (("quantile", "0.5"),)): 0.5,
        ("relay_feedback_lag_seconds", (("quantile", "0.99"),)): 1.5,
        ("relay_feedback_backlog_messages", ()): 8,
        ("relay_sns_notifications_rejected_total", ()): 2,
        ("relay_sns_notifications_unparseable_total", ()): 9,
        ("relay_reputation_bounce_ratio", ()): 0.05,
        ("relay_reputation_complaint_ratio", ()): 0.001,
        ("relay_reputation_sample_sends", ()): 400,
        ("relay_reputation_paused", ()): 1.0,
        ("relay_ses_paused", ()): 1.0,
    }
    assert set(values({})) == set(full) and set(values({}).values()) == {0}


def test_process_metrics_of_several_workers_are_summed():
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def proc(cpu: float, rss: float, start: float, fds: float) -> list:
        return [CounterMetricFamily("process_cpu_seconds", "", value=cpu),
                GaugeMetricFamily("process_resident_memory_bytes", "", value=rss),
                GaugeMetricFamily("process_start_time_seconds", "", value=start),
                GaugeMetricFamily("process_max_fds", "", value=fds)]

    merged = {f.name: f.samples[0].value
              for f in merge_processes([proc(1.5, 100, 50, 1024), proc(2.0, 300, 40, 4096)])}
    assert merged == {"process_cpu_seconds": 3.5, "process_resident_memory_bytes": 400,
                      "process_start_time_seconds": 40, "process_max_fds": 4096}


def test_metrics_count_every_worker(tmp_path):
    from tests.test_workers import send_collect

    state = SandboxState(max_send_rate=500, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        relay = RelayProcess(tmp_path, relay_sections(tmp_path, sb.url, smtp={"workers": 2}))
        relay.start()
        try:
            listening = wait_for(lambda: (lambda x: x if len(x) == 2 else None)(
                relay.events("listening")), 30)
            admin = next(line["admin"] for line in listening if line["admin"])
            relay.admin_port = int(admin.rsplit(":", 1)[1])
            ids = send_collect(relay.smtp_port, 30)
            # both workers took mail (a connection each, spread by the kernel)
            assert {partition(qid, 2) for qid in ids} == {0, 1}
            wait_for(lambda: state.recipients_sent() == 30, 30)

            def settled() -> dict | None:
                # each worker writes its share of the rate every second: the sum is the
                # account's rate once both have read GetAccount
                m = scrape(relay)
                done = (value(m, "relay_recipients_total", outcome="sent") == 30
                        and value(m, "relay_configured_send_rate_recipients_per_second") == 500)
                return m if done else None

            m = wait_for(settled, 20)
            assert value(m, "relay_messages_accepted_total") == 30
            assert value(m, "relay_smtp_sessions_total") == 30
            assert value(m, "relay_ses_call_seconds_count") == 30
            assert value(m, "relay_paused") == 0
            assert value(m, "process_open_fds") > 0
        finally:
            assert relay.stop() == 0
