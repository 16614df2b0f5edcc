"""The quick start path: the embedded sandbox's mailbox simulator feeds the ingester, so a
bounce suppresses an address with no AWS account; plus the reputation guard and resume."""

from __future__ import annotations

import urllib.error
import urllib.request

from relay.sandbox.server import SandboxState, SandboxThread
from tests.conftest import wait_for
from tests.feedback_helpers import cli, log_lines, send, statuses, suppressed

SIM = "simulator.amazonses.com"


def readyz(relay) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # the error carries the open response
            return exc.code, exc.read().decode()


def test_quick_start_bounce_suppresses_and_log_shows_it(start_relay):
    relay = start_relay("sandbox")
    bounce, ok = f"bounce@{SIM}", f"success@{SIM}"
    qid = send(relay.smtp_port, [bounce, ok])
    wait_for(lambda: bounce in suppressed(relay), 30)
    assert suppressed(relay)[bounce]["reason"] == "bounce"
    assert ok not in suppressed(relay)
    lines = log_lines(relay, bounce)
    assert any(x["kind"] == "event" and x["status"] == "bounce" for x in lines)
    # when it was listed and by which SES event (the embedded sandbox's signed envelope)
    [listed] = [x for x in lines if x["kind"] == "suppression"]
    assert listed["status"] == "bounce" and "SES bounce" in listed["detail"]
    assert "feedbackId " in listed["detail"]
    assert statuses(relay, bounce)[qid] == "bounced"
    wait_for(lambda: statuses(relay, ok).get(qid) == "delivered", 20)
    text = cli(relay, "log", bounce).stdout
    assert "bounce" in text and qid in text
    # the next message to the bounced address is not sent
    again = send(relay.smtp_port, [bounce])
    wait_for(lambda: statuses(relay, bounce).get(again) == "suppressed", 20)


def test_simulator_complaint_and_suppressionlist(start_relay):
    relay = start_relay("sandbox")
    complaint, listed, ooto = f"complaint@{SIM}", f"suppressionlist@{SIM}", f"ooto@{SIM}"
    send(relay.smtp_port, [complaint, listed, ooto])
    wait_for(lambda: {complaint, listed} <= set(suppressed(relay)), 30)
    rows = suppressed(relay)
    assert rows[complaint]["reason"] == "complaint"
    assert rows[listed]["reason"] == "bounce"
    assert "OnAccountSuppressionList" in rows[listed]["detail"]
    assert ooto not in rows


def test_reputation_guard_pauses_until_relay_resume(start_relay, tmp_path):
    sb = SandboxThread(SandboxState(outbox=tmp_path / "out", max_send_rate=1000,
                                    max_24hour_send=-1, raw_delivery=True)).start()
    try:
        relay = start_relay(sb.url, feedback={
            "sqs_queue_url": f"{sb.url}/queue/feedback", "sqs_endpoint_url": sb.url,
            "raw_delivery": True,
            "wait_time": "1s", "min_sample": 6, "max_bounce_rate": 0.2,
            "guard_interval": "0.2s"})
        for n in range(4):
            send(relay.smtp_port, [f"success+{n}@{SIM}"])
        wait_for(lambda: len(relay.events("sent")) == 4, 20)
        assert readyz(relay)[0] == 200
        for n in range(2):  # 2 bounces of 6 sent: 0.33 above 0.2
            send(relay.smtp_port, [f"bounce+{n}@{SIM}"])
        paused = wait_for(lambda: relay.find("reputation_pause"), 30)
        assert "bounce rate" in paused["reason"]
        status, text = readyz(relay)
        assert status == 503 and "reputation: bounce rate" in text
        held = send(relay.smtp_port, [f"success+late@{SIM}"])
        sent_before = len(sb.state.accepted())
        # mail stays queued while paused, also across a restart
        wait_for(lambda: held in relay.queued("active") + relay.queued("deferred"), 10)
        assert relay.find("sent", queue_id=held) is None
        assert relay.stop() == 0
        relay.start()
        assert relay.find("reputation_pause") is not None  # logged before "listening"
        assert readyz(relay)[0] == 503
        assert relay.find("sent", queue_id=held) is None
        assert held in relay.queued("active") + relay.queued("deferred")
        cli(relay, "resume")
        wait_for(lambda: relay.find("sent", queue_id=held), 30)
        assert len(sb.state.accepted()) == sent_before + 1
        assert readyz(relay)[0] == 200
    finally:
        sb.stop()
