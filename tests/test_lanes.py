"""Lanes end to end: real SMTP clients, the sandbox SES, a real relay process.

Order and counts only: which calls reached SES before which, how many of each lane in a
window of calls, what a lane over its quota share left queued. Recipients name their lane
(t*@tx.example / b*@bulk.example) so each call at the sandbox tells which lane sent it.
"""

from __future__ import annotations

import json
import smtplib
import socket
import urllib.request

from relay.config_lanes import LanesConfig, RuleConfig
from relay.ingress import credentials as auth
from relay.sandbox.server import SandboxState, SandboxThread
from tests import spoolfile
from tests.conftest import RelayProcess, relay_sections, wait_for

SENDER = "app@example.com"
BULK_HEAD = "Precedence: bulk\r\nList-Unsubscribe: <mailto:unsub@example.com>\r\n"


def msg(n: str, head: str = "") -> bytes:
    return (f"From: {SENDER}\r\nTo: x@example.net\r\nSubject: {n}\r\n{head}"
            "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def send(port: int, items: list[tuple[str, bytes]]) -> list[str]:
    """(recipient, data) each as one message over one session; the queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.example")
        for rcpt, data in items:
            s.mail(SENDER)
            s.rcpt(rcpt)
            code, reply = s.data(data)
            assert code == 250, (code, reply)
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def bulk(i: int) -> tuple[str, bytes]:
    return f"b{i}@bulk.example", msg(f"b{i}", BULK_HEAD)


def tx(i: int) -> tuple[str, bytes]:
    return f"t{i}@tx.example", msg(f"t{i}")


def lanes_of(state: SandboxState) -> list[str]:
    """The lane of each accepted call, in the order SES accepted them."""
    return ["bulk" if c.recipients[0].endswith("@bulk.example") else "tx"
            for c in state.accepted()]


def test_a_transactional_message_behind_500_bulk_is_among_the_next_few_calls(start_relay):
    state = SandboxState(max_send_rate=5, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        send(relay.smtp_port, [bulk(i) for i in range(500)])
        wait_for(lambda: len(state.accepted()) >= 3)
        before = len(state.accepted())
        send(relay.smtp_port, [tx(0)])
        wait_for(lambda: "tx" in lanes_of(state), 30)
        order = lanes_of(state)
        # the bulk calls already granted a departure may go first; nothing else
        assert order.index("tx") - before <= 4, (before, order.index("tx"))
        assert len(relay.queued("active")) > 400  # the backlog is still there
        relay.kill()


def test_with_both_lanes_busy_bulk_still_gets_its_share(start_relay):
    state = SandboxState(max_send_rate=50, max_24hour_send=-1, keep_raw=False,
                         sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        wait_for(lambda: relay.find("paused"))
        items = [bulk(i) for i in range(150)] + [tx(i) for i in range(150)]
        send(relay.smtp_port, items)
        state.sending_enabled = True
        wait_for(lambda: len(state.accepted()) >= 110, 60)
        window = lanes_of(state)[:100]
        # weights 9:1 over 100 calls: about 10 bulk, never starved, never more than fair
        assert 7 <= window.count("bulk") <= 13, window
        # the transactional mail arrived last and still went mostly first
        assert window.count("tx") >= 87
        relay.kill()


def with_lanes(tmp_path, url: str, lanes: str) -> RelayProcess:
    """A relay whose config file ends with the given [[lanes.*]] tables."""
    relay = RelayProcess(tmp_path, relay_sections(tmp_path, url))
    with relay.config.open("a") as fh:
        fh.write("\n" + lanes)
    return relay.start()


def test_a_lane_over_its_quota_share_waits_while_another_still_sends(tmp_path):
    state = SandboxState(max_send_rate=50, max_24hour_send=20, keep_raw=False,
                         sending_enabled=False)
    lanes = ('[[lanes.lane]]\nname = "transactional"\nweight = 9\n'
             '[[lanes.lane]]\nname = "bulk"\nweight = 1\nquota_share = 0.5\n')
    with SandboxThread(state) as sb:
        relay = with_lanes(tmp_path, sb.url, lanes)
        try:
            wait_for(lambda: relay.find("paused"))
            send(relay.smtp_port, [bulk(i) for i in range(20)] + [tx(i) for i in range(3)])
            state.sending_enabled = True
            # bulk sends only while the account has used less than half of its 20 a day
            wait_for(lambda: lanes_of(state).count("tx") == 3 and len(lanes_of(state)) == 10)
            # ...then waits, queued, while transactional mail still goes out
            send(relay.smtp_port, [tx(3), tx(4)])
            wait_for(lambda: lanes_of(state).count("tx") == 5, 30)
            assert lanes_of(state).count("bulk") == 7
            # the last call's result is recorded just after SES counted it
            wait_for(lambda: len(relay.queued("active")) == 13, 10)
            assert state.quota_exceeded == 0
        finally:
            relay.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rules_classify_by_port_user_sender_and_header(ingress, tmp_path):
    users = tmp_path / "users"
    auth.set_password(users, "newsletter", "pw")
    port = _free_port()
    cfg = LanesConfig(rule=(
        RuleConfig(lane="transactional", header="X-Reset"),
        RuleConfig(lane="bulk", user="newsletter"),
        RuleConfig(lane="bulk", sender="news.example.com"),
        RuleConfig(lane="bulk", header="X-Campaign"),
    ))
    by_port = ingress(port=port, handler_kw={"lanes": LanesConfig(
        rule=(RuleConfig(lane="bulk", port=port),))})
    server = ingress(allow_plain_auth_from=("127.0.0.0/8",),
                     handler_kw={"lanes": cfg, "credentials": auth.Credentials(users)})

    def lane_of_one(srv, sender: str, data: bytes, login: bool = False) -> str:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.ehlo("client.example")
            if login:
                s.login("newsletter", "pw")
            s.mail(sender)
            s.rcpt("r@example.net")
            assert s.data(data)[0] == 250
        env = max(srv.envelopes(), key=lambda e: json.loads(e)["received_at"])
        return str(json.loads(env)["lane"])

    assert lane_of_one(by_port, SENDER, msg("p")) == "bulk"
    assert lane_of_one(server, SENDER, msg("plain")) == "transactional"
    assert lane_of_one(server, SENDER, msg("u"), login=True) == "bulk"
    assert lane_of_one(server, "x@news.example.com", msg("s")) == "bulk"
    assert lane_of_one(server, SENDER, msg("h", "X-Campaign: spring\r\n")) == "bulk"
    assert lane_of_one(server, SENDER, msg("l", BULK_HEAD)) == "bulk"
    # a header cannot lift newsletter mail back into the transactional lane
    assert lane_of_one(server, "x@news.example.com", msg("r", "X-Reset: 1\r\n")) == "bulk"


SES_HEAD = ("X-SES-CONFIGURATION-SET: receipts\r\n"
            "X-SES-MESSAGE-TAGS: campaign=spring, app=shop\r\n"
            "X-SES-TENANT-NAME: tenant-a\r\n"
            "X-SES-LIST-MANAGEMENT-OPTIONS: weekly; topic=deals\r\n")


def test_x_ses_headers_become_parameters_and_vanish_from_the_bytes(tmp_path):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1)
    lanes = ('[[lanes.lane]]\nname = "transactional"\n[[lanes.lane]]\nname = "bulk"\n'
             'configuration_set = "news"\ntags = ["lane=bulk"]\ntenant = "t-bulk"\n')
    with SandboxThread(state) as sb:
        relay = with_lanes(tmp_path, sb.url, lanes)
        send(relay.smtp_port, [("a@example.net", msg("a", SES_HEAD)),
                               ("b@example.net", msg("b", BULK_HEAD))])
        wait_for(lambda: len(state.accepted()) == 2)
        calls = {c.recipients[0]: c for c in state.accepted()}
        a, b = calls["a@example.net"], calls["b@example.net"]
        assert a.configuration_set == "receipts" and a.tenant == "tenant-a"
        assert a.tags == [("campaign", "spring"), ("app", "shop")]
        assert a.list_management == {"ContactListName": "weekly", "TopicName": "deals"}
        assert b"x-ses-" not in a.raw.lower() and b"Subject: a" in a.raw
        # the bulk lane's own defaults
        assert (b.configuration_set, b.tags, b.tenant) == ("news", [("lane", "bulk")],
                                                           "t-bulk")
        relay.kill()


def test_a_bad_tag_is_refused_with_5xx_naming_the_header_and_nothing_is_queued(
        start_relay, sandbox):
    sandbox.state.sending_enabled = False
    relay = start_relay(sandbox.url)
    wait_for(lambda: relay.find("paused"))
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail(SENDER)
        s.rcpt("r@example.net")
        code, reply = s.data(msg("bad", "X-SES-MESSAGE-TAGS: campaign=spring sale\r\n"))
        assert code == 554 and b"X-SES-MESSAGE-TAGS" in reply, (code, reply)
        assert relay.queued("active") == [] and relay.queued("incoming") == []
        # the session goes on
        s.mail(SENDER)
        s.rcpt("r@example.net")
        assert s.data(msg("good"))[0] == 250
    assert len(relay.queued("active")) == 1
    relay.kill()


def test_lanes_survive_a_restart(start_relay, tmp_path):
    state = SandboxState(max_send_rate=20, max_24hour_send=-1, keep_raw=False,
                         sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        wait_for(lambda: relay.find("paused"))
        bulk_ids = send(relay.smtp_port, [bulk(i) for i in range(60)])
        tx_ids = send(relay.smtp_port, [tx(0), tx(1)])
        assert relay.stop() == 0
        env = spoolfile.record(relay.spool / "active" / tx_ids[0])
        assert env["lane"] == "transactional"
        env = spoolfile.record(relay.spool / "active" / bulk_ids[0])
        assert env["lane"] == "bulk"
        state.sending_enabled = True
        relay.start()
        wait_for(lambda: lanes_of(state).count("tx") == 2, 30)
        # read back from the spool, the transactional mail still goes ahead of the
        # backlog (bulk has its one call in ten; the few calls in flight finish in any order)
        assert lanes_of(state)[:4].count("tx") == 2, lanes_of(state)[:5]
        relay.kill()


def test_the_rate_holds_with_two_workers_and_both_lanes_busy(tmp_path):
    state = SandboxState(max_send_rate=20, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        relay = RelayProcess(tmp_path, relay_sections(tmp_path, sb.url, smtp={"workers": 2}))
        relay.start()
        try:
            items = [bulk(i) for i in range(100)] + [tx(i) for i in range(60)]
            for k in range(0, len(items), 10):  # connections spread over both workers
                send(relay.smtp_port, items[k:k + 10])
            wait_for(lambda: state.recipients_sent() >= 160, 60)
            assert state.throttles == 0
            assert state.max_window(1.0) <= 20
            assert lanes_of(state).count("tx") == 60
        finally:
            relay.stop()


def test_queue_tools_and_metrics_show_lanes_and_hold_release_a_lane(start_relay):
    from tests.test_queue import queue_json, relay_cli

    state = SandboxState(max_send_rate=50, max_24hour_send=-1, sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        wait_for(lambda: relay.find("paused"))
        bulk_ids = send(relay.smtp_port, [bulk(i) for i in range(4)])
        tx_ids = send(relay.smtp_port, [("a@example.net", msg("a", SES_HEAD))])
        assert {r["id"] for r in queue_json(relay, "--lane", "bulk")} == set(bulk_ids)
        assert [r["lane"] for r in queue_json(relay, "--lane", "transactional")] == [
            "transactional"]
        out = relay_cli(relay, "queue", "stats", "--json")
        assert json.loads(out.stdout)["lanes"] == {
            "bulk": {"active": 4, "deferred": 0, "hold": 0},
            "transactional": {"active": 1, "deferred": 0, "hold": 0}}
        shown = relay_cli(relay, "queue", "show", tx_ids[0]).stdout
        assert "lane        transactional" in shown and "campaign=spring" in shown
        # a lane paused by hand: its mail held, the other lane still goes
        out = relay_cli(relay, "queue", "hold", "--lane", "bulk")
        assert out.returncode == 0, out.stderr
        assert sorted(relay.queued("hold")) == sorted(bulk_ids)
        state.sending_enabled = True
        wait_for(lambda: len(state.accepted()) == 1)
        # the sent message leaves active/ once its result is flushed, a moment after SES
        wait_for(lambda: relay.queued("active") == [])
        assert len(state.accepted()) == 1 and sorted(relay.queued("hold")) == sorted(bulk_ids)
        out = relay_cli(relay, "queue", "release", "--lane", "bulk")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(state.accepted()) == 5)
        assert lanes_of(state) == ["tx", "bulk", "bulk", "bulk", "bulk"]
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=10).read().decode()
        assert 'relay_lane_messages_queued_total{lane="bulk"} 4.0' in metrics
        assert 'relay_lane_recipients_total{lane="transactional",outcome="sent"} 1.0' in metrics
        assert 'relay_lane_queue_delay_seconds_count{lane="bulk"} 4.0' in metrics
        assert any(line.get("lane") == "bulk" for line in relay.events("accepted"))
        relay.kill()


def test_sendmail_spooling_locally_decides_the_lane_and_the_ses_options(start_relay, sandbox):
    from tests.test_sendmail import sendmail

    relay = start_relay(sandbox.url)
    port = relay.smtp_port
    assert relay.stop() == 0  # nothing listens: sendmail writes the spool itself
    data = (f"From: {SENDER}\r\nTo: r@example.net\r\nSubject: s\r\n{BULK_HEAD}{SES_HEAD}"
            "\r\nbody\r\n")
    out = sendmail(relay, port, "-t", data=data)
    assert out.returncode == 0, out.stderr
    (qid,) = relay.queued("active")
    env = spoolfile.record(relay.spool / "active" / qid)
    assert env["lane"] == "bulk" and env["ses"]["tenant"] == "tenant-a"
    bad = sendmail(relay, port, "-t", data=data.replace("campaign=spring", "campaign=a b"))
    assert bad.returncode != 0 and "X-SES-MESSAGE-TAGS" in bad.stderr
    assert relay.queued("active") == [qid]
    relay.start()
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert calls[0].tenant == "tenant-a" and b"X-SES-" not in calls[0].raw
