"""The delivery engine against the sandbox: rate, splitting, every class of SES answer."""

from __future__ import annotations

import email
import smtplib
import socket
import urllib.error
import urllib.request

from relay.sandbox.server import SandboxState, SandboxThread
from tests import spoolfile
from tests.conftest import relayed, wait_for

SENDER = "app@example.com"


def msg(n: int | str, rcpts: list[str]) -> bytes:
    return (f"From: {SENDER}\r\nTo: {', '.join(rcpts[:3])}\r\nSubject: m{n}\r\n"
            "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <m{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def send_many(port: int, messages: list[tuple[list[str], bytes]],
              sender: str = SENDER) -> list[str]:
    """Send each (recipients, data) over one session; returns the queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.example")
        for rcpts, data in messages:
            s.mail(sender)
            for r in rcpts:
                assert s.rcpt(r)[0] == 250
            code, reply = s.data(data)
            assert code == 250, (code, reply)
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def readyz(relay) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def spool_empty(relay) -> bool:
    return not relay.queued("active") and not relay.queued("deferred")


def test_rate_50_for_1000_messages_never_exceeds_a_second(start_relay):
    state = SandboxState(max_send_rate=50, max_24hour_send=-1, latency=0.05, keep_raw=False)
    with SandboxThread(state) as sb:
        # max_rate 0: the account's MaxSendRate (50) rules. The sandbox counts each call
        # at the relay's departure stamp, so CPU contention on this shared machine between
        # the two processes is not counted against the relay (bench/ reports arrivals too).
        relay = start_relay(sb.url)
        # Queue everything first (SES paused), then drain: SMTP ingest sharing the event
        # loop with delivery adds departure jitter that is measured separately (bench/).
        state.sending_enabled = False
        batch = [([f"r{i}@example.net"], msg(i, [f"r{i}@example.net"])) for i in range(1000)]
        send_many(relay.smtp_port, batch)
        wait_for(lambda: relay.find("paused"), 20)
        state.sending_enabled = True
        wait_for(lambda: state.recipients_sent() >= 1000, 120)
        wait_for(lambda: spool_empty(relay), 20)
    assert state.recipients_sent() == 1000
    assert state.throttles == 0
    assert state.max_window(1.0) <= 50
    delivered = sorted(r for c in state.accepted() for r in c.recipients)
    assert delivered == sorted(f"r{i}@example.net" for i in range(1000))


def test_120_recipients_go_as_50_50_20(start_relay):
    state = SandboxState(max_send_rate=500, max_24hour_send=-1)
    rcpts = [f"u{i:03d}@example.net" for i in range(120)]
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        send_many(relay.smtp_port, [(rcpts, msg("big", rcpts))])
        wait_for(lambda: state.recipients_sent() >= 120, 30)
        wait_for(lambda: spool_empty(relay), 20)
    assert [c.recipients for c in state.calls] == [rcpts[:50], rcpts[50:100], rcpts[100:]]
    assert all(relayed(c.raw) == msg("big", rcpts) for c in state.calls)


def test_failed_second_call_resends_only_the_remaining_70(start_relay):
    state = SandboxState(max_send_rate=500, max_24hour_send=-1)
    state.script("ok", "5xx")  # the second call fails transiently
    rcpts = [f"u{i:03d}@example.net" for i in range(120)]
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        send_many(relay.smtp_port, [(rcpts, msg("big", rcpts))])
        wait_for(lambda: state.recipients_sent() >= 120, 30)
        wait_for(lambda: spool_empty(relay), 20)
    calls = list(state.calls)
    assert [len(c.recipients) for c in calls] == [50, 50, 50, 20]
    assert calls[1].error == "InternalFailure" and calls[1].recipients == rcpts[50:100]
    # the retry went to the 70 not yet accepted, never again to the first 50
    assert [c.recipients for c in state.accepted()] == [rcpts[:50], rcpts[50:100], rcpts[100:]]
    deferred = relay.find("deferred")
    assert deferred and "InternalFailure" in deferred["error"]


def test_kill_during_second_call_never_resends_the_first_50(start_relay):
    """Invariant 3: each call's accepted recipients are durable before the next call."""
    state = SandboxState(max_send_rate=500, max_24hour_send=-1, slow_seconds=3.0)
    state.script("ok", "slow")  # the second call hangs for 3 s
    rcpts = [f"k{i:03d}@example.net" for i in range(120)]
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        send_many(relay.smtp_port, [(rcpts, msg("kill2", rcpts))])
        wait_for(lambda: len(state.accepted()) == 1 and state.inflight == 1, 20)
        relay.kill()  # while the second call is in flight
        relay.start()
        wait_for(lambda: spool_empty(relay) and state.inflight == 0, 30)
    sent = [r for c in state.accepted() for r in c.recipients]
    assert sorted(set(sent)) == rcpts  # everyone delivered
    first = set(rcpts[:50])
    assert sum(1 for r in sent if r in first) == 50  # the first call's 50: never again
    # the call in flight at the kill is the documented window: its 50 may go twice
    assert all(sent.count(r) <= 2 for r in rcpts[50:100])
    assert all(sent.count(r) == 1 for r in rcpts[100:])


def test_sending_paused_stops_all_calls_and_resumes_by_itself(start_relay):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        assert readyz(relay)[0] == 200
        state.sending_enabled = False  # SendEmail now answers SendingPausedException
        batch = [([f"p{i}@example.net"], msg(i, [f"p{i}@example.net"])) for i in range(5)]
        send_many(relay.smtp_port, batch)
        code, text = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(readyz(relay)), 20)
        assert "paused" in text
        # the log line may follow /readyz's 503 by a moment: wait for it, do not race it
        assert wait_for(lambda: relay.find("paused"), 20) is not None
        calls_when_paused = len(state.calls)
        assert calls_when_paused >= 1 and state.accepted() == []
        # several GetAccount probes later, still no SendEmail call and nothing failed
        reads = state.account_reads
        wait_for(lambda: state.account_reads >= reads + 3, 20)
        assert len(state.calls) == calls_when_paused
        assert relay.queued("failed") == []
        assert len(relay.queued("active")) + len(relay.queued("deferred")) == 5

        state.sending_enabled = True
        wait_for(lambda: state.recipients_sent() == 5, 20)
        wait_for(lambda: spool_empty(relay), 10)
        assert readyz(relay)[0] == 200
        assert relay.find("resumed") is not None
    assert relay.queued("failed") == []


def test_expired_message_goes_to_failed_with_expired(start_relay):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = start_relay(f"http://127.0.0.1:{port}", delivery={"max_lifetime": "2s", "max_rate": 10},
                        ses={"connect_timeout": "1s"})
    (qid,) = send_many(relay.smtp_port, [(["e@example.net"], msg("exp", ["e@example.net"]))])
    wait_for(lambda: qid in relay.queued("failed"), 30)
    record = spoolfile.record(relay.spool / "failed" / qid)
    assert record["results"]["e@example.net"]["status"] == "failed"
    assert record["results"]["e@example.net"]["reason"].startswith("expired")
    assert record["attempts"] >= 1


def test_24_hour_quota_of_100_lets_exactly_100_recipients_through(start_relay):
    state = SandboxState(max_send_rate=200, max_24hour_send=100)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        batch = [([f"q{i}a@example.net", f"q{i}b@example.net", f"q{i}c@example.net"],
                  msg(i, ["x"])) for i in range(40)]  # 120 recipients
        send_many(relay.smtp_port, batch)
        wait_for(lambda: state.recipients_sent() >= 100, 30)
        wait_for(lambda: len(relay.events("deferred")) > 0 and not relay.queued("active"), 20)
        assert state.recipients_sent() == 100
        assert state.quota_exceeded == 0  # the relay never asked beyond the quota
        assert relay.queued("failed") == []
        deferred = relay.queued("deferred")
        assert deferred
        errors = {spoolfile.record(relay.spool / "deferred" / q)
                  ["last_error"] for q in deferred}
        assert errors == {"24-hour sending quota used up"}


def test_throttle_answer_slows_and_retries_without_failing(start_relay):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1)
    state.script("throttle", "throttle")
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        send_many(relay.smtp_port, [(["t@example.net"], msg("thr", ["t@example.net"]))])
        wait_for(lambda: state.recipients_sent() == 1, 30)
        wait_for(lambda: spool_empty(relay), 10)
    assert [c.error for c in state.calls] == ["TooManyRequestsException"] * 2 + [""]
    assert len(relay.events("throttled")) == 2
    assert relay.queued("failed") == []


def test_configuration_error_holds_the_mail_and_says_so(start_relay):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1)
    state.script("mailfrom")
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        (qid,) = send_many(relay.smtp_port, [(["h@example.net"], msg("hold", ["h@example.net"]))])
        wait_for(lambda: qid in relay.queued("hold"), 20)
    held = relay.find("held")
    assert held and held["level"] == "error" and "MailFromDomainNotVerified" in held["error"]
    record = spoolfile.record(relay.spool / "hold" / qid)
    assert "MailFromDomainNotVerified" in record["last_error"]
    assert record["results"] == {}


def test_permanent_failure_sends_a_dsn_to_the_sender_but_never_for_null_sender(start_relay):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1)
    state.script("rejected")
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, delivery={"dsn_from": "mailer-daemon@example.com"})
        send_many(relay.smtp_port, [(["bad@example.net"], msg("rej", ["bad@example.net"]))])
        dsn_call = wait_for(lambda: state.accepted(), 20)[0]
        assert dsn_call.recipients == [SENDER]
        assert dsn_call.sender == ""  # a DSN has a null envelope sender
        report = email.message_from_bytes(dsn_call.raw)
        assert report.get_content_type() == "multipart/report"
        parts = {p.get_content_type(): p for p in report.walk()}
        status = parts["message/delivery-status"].get_payload()
        assert status[1]["Final-Recipient"] == "rfc822; bad@example.net"
        assert status[1]["Action"] == "failed"
        assert "MessageRejected" in status[1]["Diagnostic-Code"]

        # a failed message with a null sender gets no DSN
        state.script("rejected")
        send_many(relay.smtp_port, [(["bad2@example.net"], msg("rej2", ["bad2@example.net"]))],
                  sender="")
        wait_for(lambda: len(relay.queued("failed")) == 2, 20)
        assert len(state.accepted()) == 1


def test_sigterm_finishes_the_call_in_flight_and_keeps_the_rest(start_relay):
    state = SandboxState(max_send_rate=1, max_24hour_send=-1, latency=1.5)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        batch = [([f"s{i}@example.net"], msg(i, [f"s{i}@example.net"])) for i in range(3)]
        send_many(relay.smtp_port, batch)
        wait_for(lambda: state.inflight == 1, 20)
        relay.proc.send_signal(15)
        # a new client during shutdown is not accepted
        try:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=5) as s:
                s.ehlo("c")
                code, _ = s.mail(SENDER)
                assert code == 421
        except (ConnectionError, smtplib.SMTPException, OSError):
            pass
        assert relay.proc.wait(timeout=30) == 0
    assert len(state.accepted()) == 1
    sent = state.accepted()[0].recipients[0]
    left = relay.queued("active") + relay.queued("deferred")
    assert len(left) == 2
    for qid in left:
        for st in ("active", "deferred"):
            p = relay.spool / st / qid
            if p.exists():
                assert sent not in spoolfile.record(p)["recipients"]
