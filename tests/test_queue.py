"""`relay queue ...` against a running `relay serve` child process and the SES sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.sandbox.server import SandboxState, SandboxThread
from relay.spool.queue import Queue, arrival, bucket
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
from tests import spoolfile
from tests.conftest import ROOT, RelayProcess, relayed, wait_for
from tests.test_spine import message, send

#: long enough that nothing deferred comes back by itself during a test
SLOW_RETRY = {"min_backoff": "1h", "max_backoff": "2h"}


def relay_cli(relay: RelayProcess, *args: str, stdin: str | None = None,
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "relay", *args[:2], "-c", str(relay.config), *args[2:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                          input=stdin if stdin is not None else "",
                          cwd=relay.workdir)


def queue_json(relay: RelayProcess, *args: str) -> list[dict]:
    out = relay_cli(relay, "queue", "list", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def qid_of(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[1]


def test_deferred_message_replayed_with_retry(start_relay, tmp_path):
    state = SandboxState(max_send_rate=100)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, delivery=SLOW_RETRY)
        state.script("5xx")
        code, reply = send(relay.smtp_port, ["a@example.net", "b@example.org"], message("replay"))
        assert code == 250
        qid = qid_of(reply)
        wait_for(lambda: qid in relay.queued("deferred"), 20)

        rows = queue_json(relay, "--state", "deferred")
        assert [r["id"] for r in rows] == [qid]
        row = rows[0]
        assert row["attempts"] == 1 and "InternalFailure" in row["last_error"]
        assert row["recipients"] == 2 and row["pending"] == 2
        assert row["next_attempt"] > time.time() + 600  # an hour or so away
        assert queue_json(relay, "--state", "active") == []
        assert [r["id"] for r in queue_json(relay, "--recipient", "@example.org")] == [qid]
        assert queue_json(relay, "--sender", "other@example.com") == []
        assert queue_json(relay, "--older-than", "1h") == []

        shown = relay_cli(relay, "queue", "show", qid, "--json")
        doc = json.loads(shown.stdout)
        assert doc["state"] == "deferred" and doc["headers"]["Subject"] == "replay"
        assert doc["envelope"]["recipients"] == ["a@example.net", "b@example.org"]
        assert doc["pending_recipients"] == ["a@example.net", "b@example.org"]
        text = relay_cli(relay, "queue", "show", qid).stdout
        assert "InternalFailure" in text and "Message-ID:" in text
        # the file it names reads as `show` says: the record, then the message
        assert f"head -1 {doc['path']} (record); tail -n +2 {doc['path']} (message)" in text
        assert spoolfile.record(Path(doc["path"]))["id"] == qid
        assert b"Subject: replay" in spoolfile.mime(Path(doc["path"]))

        stats = json.loads(relay_cli(relay, "queue", "stats", "--json").stdout)
        assert stats["states"]["deferred"]["T"] == 1 and stats["total"] == 1
        assert stats["deferred_domains"][0]["T"] == 1
        assert {d["domain"] for d in stats["deferred_domains"]} == {"example.net", "example.org"}

        out = relay_cli(relay, "queue", "retry", qid)
        assert out.returncode == 0, out.stderr
        assert "deferred -> active" in out.stdout
        wait_for(lambda: state.accepted(), 5)
        wait_for(lambda: not relay.queued("active") and not relay.queued("deferred"), 5)
        calls = state.accepted()
        assert len(calls) == 1 and relayed(calls[0].raw) == message("replay")
        assert calls[0].recipients == ["a@example.net", "b@example.org"]
        # logged outcomes, recipients hashed
        assert relay.find("accepted", queue_id=qid) and relay.find("deferred", queue_id=qid)
        # the message leaves active/ first (its record), then the line is logged
        sent = wait_for(lambda: relay.find("sent", queue_id=qid), 5)
        assert sent["ses_message_id"] == calls[0].message_id
        assert "a@example.net" not in json.dumps(relay.lines)

        gone = relay_cli(relay, "queue", "retry", qid)
        assert gone.returncode == 1 and "no such message" in gone.stderr


def test_held_message_is_never_sent_until_released(start_relay):
    # sending disabled: everything waits in active/, where an operator can hold it
    state = SandboxState(max_send_rate=100, sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, delivery=SLOW_RETRY)
        wait_for(lambda: relay.find("paused"), 10)
        _, r1 = send(relay.smtp_port, ["held@example.net"], message("held"))
        _, r2 = send(relay.smtp_port, ["free@example.net"], message("free"))
        held, free = qid_of(r1), qid_of(r2)
        out = relay_cli(relay, "queue", "hold", held)
        assert out.returncode == 0 and "active -> hold" in out.stdout
        assert relay.queued("hold") == [held]

        state.sending_enabled = True  # the pool probes GetAccount and resumes
        wait_for(lambda: len(state.accepted()) == 1, 20)
        assert relayed(state.accepted()[0].raw) == message("free")
        # the pool scans every 0.1 s: let it pass over hold/ many times
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert relay.queued("hold") == [held]
            time.sleep(0.1)
        assert len(state.accepted()) == 1
        # retry --all touches deferred mail only
        assert relay_cli(relay, "queue", "retry", "--all", "--yes").returncode == 0
        assert relay.queued("hold") == [held]
        wrong = relay_cli(relay, "queue", "retry", held)
        assert wrong.returncode == 1 and "is held: release it" in wrong.stderr

        out = relay_cli(relay, "queue", "release", held)
        assert out.returncode == 0 and "hold -> active" in out.stdout
        wait_for(lambda: len(state.accepted()) == 2, 5)
        assert relayed(state.accepted()[1].raw) == message("held")
        wait_for(lambda: not relay.queued("active"), 5)
        assert free  # delivered first, once
        assert [c.recipients for c in state.accepted()] == [["free@example.net"],
                                                            ["held@example.net"]]


def test_hold_during_ses_call_records_result_and_never_resends(start_relay):
    state = SandboxState(max_send_rate=100)
    state.answers.clear()  # the sandbox answers SendEmail only once the test says so
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, delivery=SLOW_RETRY)
        _, reply = send(relay.smtp_port, ["a@example.net"], message("inflight"))
        qid = qid_of(reply)
        wait_for(lambda: state.inflight == 1, 20)  # the pool's call waits at the sandbox
        assert relay_cli(relay, "queue", "hold", qid).returncode == 0
        assert state.accepted() == []
        state.answers.set()
        # the SES answer is recorded in the message's new place, not in a second copy
        env = relay.spool / "hold" / qid
        wait_for(lambda: spoolfile.record(env)["results"], 10)
        result = spoolfile.record(env)["results"]["a@example.net"]
        assert result["status"] == "sent"
        assert result["ses_message_id"] == state.accepted()[0].message_id
        assert not (relay.spool / "active" / qid).exists()
        # released: nothing is pending, so the pool finishes it without a second call
        assert relay_cli(relay, "queue", "release", qid).returncode == 0
        wait_for(lambda: not relay.queued("active") and not relay.queued("hold"), 5)
        assert len(state.calls) == 1


def test_delete_asks_unless_yes_and_requeue_retries_failed(start_relay):
    state = SandboxState(max_send_rate=100)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url, delivery=SLOW_RETRY)
        state.script("rejected", "5xx")
        _, r1 = send(relay.smtp_port, ["a@example.net"], message("rejected"))
        failed = qid_of(r1)
        wait_for(lambda: failed in relay.queued("failed"), 20)
        _, r2 = send(relay.smtp_port, ["b@example.net"], message("deferred"))
        deferred = qid_of(r2)
        wait_for(lambda: deferred in relay.queued("deferred"), 20)

        out = relay_cli(relay, "queue", "delete", deferred)
        assert out.returncode == 1 and "--yes" in out.stderr
        assert relay.queued("deferred") == [deferred]
        out = relay_cli(relay, "queue", "delete", "--yes", deferred, "NOSUCHID")
        assert out.returncode == 1 and "NOSUCHID" in out.stderr
        assert relay.queued("deferred") == [] and relay.queued("incoming") == []

        out = relay_cli(relay, "queue", "requeue", failed, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"id": failed, "ok": True,
                                          "result": "failed -> active (requeued)"}
        wait_for(lambda: state.accepted(), 5)
        assert [relayed(c.raw) for c in state.accepted()] == [message("rejected")]
        wait_for(lambda: not relay.queued("active") and not relay.queued("failed"), 5)
        assert relay.find("failed", queue_id=failed)


def test_bad_arguments_name_the_problem(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    out = relay_cli(relay, "queue", "list", "--older-than", "soon")
    assert out.returncode == 2 and "--older-than" in out.stderr
    out = relay_cli(relay, "queue", "show", "../etc")
    assert out.returncode == 1 and "not a queue id" in out.stderr
    out = relay_cli(relay, "queue", "hold")
    assert out.returncode == 1 and "queue ids" in out.stderr


def test_save_follows_a_renamed_message_and_never_recreates_it(tmp_path: Path):
    spool = Spool(tmp_path, fsync=False)
    spool.ensure()
    qid = spool.accept(Envelope("a@x.example", ("b@y.example",), time.time()), b"m\r\n")
    rec = spool.load(State.ACTIVE, qid)
    os.rename(spool.path(State.ACTIVE, qid), spool.path(State.HOLD, qid))
    rec.results["b@y.example"] = {"status": "sent", "at": 1.0, "ses_message_id": "X"}
    assert spool.save(State.ACTIVE, rec) is State.HOLD
    assert not spool.path(State.ACTIVE, qid).exists()
    assert spool.load(State.HOLD, qid).results["b@y.example"]["ses_message_id"] == "X"
    Queue(spool).delete([qid])
    with pytest.raises(FileNotFoundError):
        spool.save(State.ACTIVE, rec)
    assert list(spool.dir(State.INCOMING).iterdir()) == []


@pytest.mark.parametrize("age,name", [(0, "5"), (299, "5"), (300, "10"), (4799, "80"),
                                      (1280 * 60 - 1, "1280"), (1280 * 60, "1280+")])
def test_age_buckets(age: float, name: str):
    assert bucket(age) == name


def test_arrival_time_comes_from_the_queue_id(tmp_path: Path):
    spool = Spool(tmp_path, fsync=False)
    spool.ensure()
    before = time.time()
    qid = spool.accept(Envelope("a@x.example", ("b@y.example",), before), b"m\r\n")
    assert before - 0.001 <= arrival(qid) <= time.time() + 0.001
    assert arrival("not-hex-at-all") is None


def test_progress_shows_on_a_terminal_only(tmp_path: Path):
    import pty

    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure()
    for _ in range(300):
        qid = spool.accept(Envelope("a@x.example", ("b@y.example",), time.time()), b"m\r\n")
        spool.move(qid, State.ACTIVE, State.DEFERRED, when=time.time() + 3600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {"PYTHONPATH": str(ROOT), "RELAY_SPOOL__DIR": str(tmp_path / "spool")}
    cmd = [sys.executable, "-m", "relay", "queue", "retry", "--all", "--yes"]
    main, child = pty.openpty()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=child, env=env,
                              timeout=60, cwd=tmp_path)
        os.close(child)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0
    assert b"retry: 300/300" in seen and b"retry: 300 of 300 message(s)" in seen
    assert sum(1 for _ in spool.scan(State.ACTIVE)) == 300
    # back to deferred, then the same run with stderr on a pipe: no counter
    for qid in list(spool.scan(State.ACTIVE)):
        spool.move(qid, State.ACTIVE, State.DEFERRED, when=time.time() + 3600)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "300/300" not in out.stderr
    assert "retry: 300 of 300 message(s)" in out.stderr


def test_stats_sample_scales_domain_counts(tmp_path: Path):
    spool = Spool(tmp_path, fsync=False)
    spool.ensure()
    for i in range(30):
        qid = spool.accept(Envelope("a@x.example", (f"u{i}@d.example",), time.time()), b"m\r\n")
        spool.move(qid, State.ACTIVE, State.DEFERRED, when=time.time() + 3600)
    exact = Queue(spool).stats()
    assert exact["deferred_domains"] == [{"domain": "d.example", "T": 30, "5": 30,
                                          **{b: 0 for b in exact["deferred_domains"][0]
                                             if b not in ("domain", "T", "5")}}]
    assert exact["deferred_sampled"] == 0
    sampled = Queue(spool).stats(sample=10)
    assert sampled["deferred_sampled"] == 10
    assert sampled["deferred_domains"][0]["T"] == 30
    assert sampled["states"] == exact["states"]
