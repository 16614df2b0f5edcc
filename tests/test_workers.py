"""smtp.workers > 1: several processes on one port and one spool, one account rate.

Real `relay serve` processes (a supervisor and its workers), a real SMTP client, the
sandbox counting every call against its rate.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ops.workers import MAX_RESTARTS
from relay.sandbox.server import SandboxState, SandboxThread
from relay.spool.record import partition
from tests.conftest import ROOT, RelayProcess, relay_sections, wait_for, write_config

SENDER = "app@example.com"


def msg(n: int) -> bytes:
    return (f"From: {SENDER}\r\nTo: r{n}@example.net\r\nSubject: w{n}\r\n"
            f"Message-ID: <w{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def send_collect(port: int, count: int) -> list[str]:
    ids = []
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example")
            s.mail(SENDER)
            assert s.rcpt(f"r{n}@example.net")[0] == 250
            code, reply = s.data(msg(n))
            assert code == 250, (code, reply)
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def two_workers(tmp_path, url: str) -> RelayProcess:
    relay = RelayProcess(tmp_path, relay_sections(tmp_path, url, smtp={"workers": 2}))
    relay.start()
    wait_for(lambda: len(relay.events("listening")) == 2, 30)
    return relay


def test_two_workers_share_the_port_the_spool_and_the_rate(tmp_path):
    state = SandboxState(max_send_rate=40, max_24hour_send=-1, latency=0.05, keep_raw=False)
    with SandboxThread(state) as sb:
        relay = two_workers(tmp_path, sb.url)
        try:
            listening = relay.events("listening")
            assert {line["worker"] for line in listening} == {0, 1}
            assert len({line["smtp"] for line in listening}) == 1  # one port
            assert [bool(line["admin"]) for line in sorted(listening, key=lambda x: x["worker"])] \
                == [True, False]
            state.sending_enabled = False  # queue first, then drain at the account's rate
            ids = send_collect(relay.smtp_port, 200)
            # both workers accepted mail, each into its own partition of the spool
            assert {partition(qid, 2) for qid in ids} == {0, 1}
            wait_for(lambda: len(relay.events("paused")) >= 2, 20)
            state.sending_enabled = True
            wait_for(lambda: state.recipients_sent() >= 200, 60)
            wait_for(lambda: not relay.queued("active") and not relay.queued("deferred"), 20)
        finally:
            assert relay.stop() == 0
    assert state.throttles == 0
    assert state.max_window(1.0) <= 40
    delivered = sorted(r for c in state.accepted() for r in c.recipients)
    assert delivered == sorted(f"r{n}@example.net" for n in range(200))
    assert len(relay.events("sent")) == 200


def test_a_killed_worker_is_restarted_and_its_mail_delivered_once(tmp_path):
    state = SandboxState(max_send_rate=200, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        relay = two_workers(tmp_path, sb.url)
        try:
            state.sending_enabled = False
            ids = send_collect(relay.smtp_port, 40)
            pids = relay.find("workers")["pids"]
            os.kill(pids[1], signal.SIGKILL)
            wait_for(lambda: relay.find("worker_restarted", worker=1), 20)
            wait_for(lambda: len(relay.events("listening")) == 3, 30)
            state.sending_enabled = True
            wait_for(lambda: state.recipients_sent() >= 40, 60)
            wait_for(lambda: not relay.queued("active"), 20)
        finally:
            assert relay.stop() == 0
    assert {partition(qid, 2) for qid in ids} == {0, 1}
    delivered = sorted(r for c in state.accepted() for r in c.recipients)
    assert delivered == sorted(f"r{n}@example.net" for n in range(40))
    # the supervisor's SIGTERM stopped every worker
    for pid in pids[:1]:
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def children(pid: int) -> list[int]:
    task = Path(f"/proc/{pid}/task")
    return [int(c) for tid in task.iterdir() for c in (tid / "children").read_text().split()]


def thread_cores(pid: int) -> list[set[int]]:
    """The CPU affinity of each thread of a process."""
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_one_worker_per_core_pins_each_to_its_own_core_unless_told_not_to(tmp_path):
    mask = sorted(os.sched_getaffinity(0))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with SandboxThread(SandboxState(keep_raw=False)) as sb:
        relay = RelayProcess(tmp_path / "a", relay_sections(tmp_path / "a", sb.url,
                                                            smtp={"workers": len(mask)}))
        relay.start()
        try:
            wait_for(lambda: len(relay.events("listening")) == len(mask), 30)
            pids = relay.find("workers")["pids"]
            assert relay.find("workers")["cores"] == mask
            for pid, core in zip(pids, mask, strict=True):
                assert all(cores == {core} for cores in thread_cores(pid))
            assert relay.proc is not None
            assert os.sched_getaffinity(relay.proc.pid) == set(mask)  # not the supervisor
            os.kill(pids[1], signal.SIGKILL)  # a restarted worker gets its core back
            wait_for(lambda: relay.find("worker_restarted", worker=1), 20)
            wait_for(lambda: len(relay.events("listening")) == len(mask) + 1, 30)
            assert relay.proc is not None
            new = set(children(relay.proc.pid)) - set(pids)
            assert len(new) == 1
            assert all(cores == {mask[1]} for cores in thread_cores(new.pop()))
        finally:
            assert relay.stop() == 0
        relay = RelayProcess(tmp_path / "b", relay_sections(
            tmp_path / "b", sb.url, smtp={"workers": len(mask), "pin_workers": False}))
        relay.start()
        try:
            wait_for(lambda: len(relay.events("listening")) == len(mask), 30)
            assert relay.find("workers")["cores"] is None
            for pid in relay.find("workers")["pids"]:
                assert all(cores == set(mask) for cores in thread_cores(pid))
        finally:
            assert relay.stop() == 0


def test_workers_need_a_real_endpoint_and_a_sane_count(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT)
    for value, endpoint in (("2", "sandbox"), ("0", "http://127.0.0.1:9")):
        out = subprocess.run(
            [sys.executable, "-m", "relay", "serve"], cwd=tmp_path, timeout=60,
            env=dict(env, RELAY_SMTP__WORKERS=value, RELAY_SES__ENDPOINT_URL=endpoint,
                     RELAY_SPOOL__DIR=str(tmp_path / "spool")),
            capture_output=True, text=True)
        assert out.returncode == 2 and "smtp.workers" in out.stderr, out.stderr


def test_workers_that_keep_dying_stop_the_supervisor_with_exit_1(tmp_path):
    # a database nobody answers for (a free port holds no server): every worker fails to
    # open it and exits; the supervisor's own checks before start-up do not connect to it
    with socket.socket() as free, SandboxThread(SandboxState()) as sb:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        config = write_config(tmp_path / "relay.toml", relay_sections(
            tmp_path, sb.url, smtp={"workers": 2},
            database={"url": f"postgresql://relay@127.0.0.1:{port}/relay"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        out = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(config)],
                             cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)), timeout=240,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
    events = []
    for line in out.stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    names = [e.get("event") for e in events]
    assert out.returncode == 1, out.stderr[-3000:]
    failing = [e for e in events if e.get("event") == "workers_failing"]
    assert len(failing) == 1 and failing[0]["restarts"] == MAX_RESTARTS, names
    assert names.count("worker_restarted") >= MAX_RESTARTS
    assert "listening" not in names
    assert names[-1] == "stopped"


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_no_second_supervisor_or_worker_while_old_workers_still_deliver(tmp_path):
    """The spool's lock lasts until the last worker exits; each partition has its own."""
    state = SandboxState(max_send_rate=200, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        sections = relay_sections(tmp_path, sb.url, smtp={"workers": 2},
                                  delivery={"shutdown_timeout": "60s"})
        relay = RelayProcess(tmp_path, sections)
        (tmp_path / "second").mkdir()
        second = RelayProcess(tmp_path / "second", sections)
        try:
            relay.start()
            wait_for(lambda: len(relay.events("listening")) == 2, 30)
            pids = relay.find("workers")["pids"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
            # a stray worker for a partition that is being delivered stops at once
            out = subprocess.run(
                [sys.executable, "-m", "relay", "serve", "--worker", "1", "-c",
                 str(relay.config)], cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)),
                timeout=60, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            assert out.returncode == 1, out.stderr[-2000:]
            assert f"partition 1 is still delivered by pid {pids[1]}" in out.stderr

            state.answers.clear()  # the workers' calls wait in the sandbox
            send_collect(relay.smtp_port, 6)
            wait_for(lambda: state.inflight >= 1, 20)
            relay.kill()  # the supervisor only: its workers finish their held calls
            assert all(alive(pid) for pid in pids)
            with pytest.raises(AssertionError, match="did not start"):
                second.start(timeout=60)
            assert any("in use by another relay" in line for line in second.raw_lines)
            assert all(alive(pid) for pid in pids)

            state.answers.set()
            wait_for(lambda: not any(alive(pid) for pid in pids), 60)
            second.start()  # the old workers are gone: the lock is free
            wait_for(lambda: len(second.events("listening")) == 2, 30)
            wait_for(lambda: state.recipients_sent() >= 6, 60)
            wait_for(lambda: not second.queued("active"), 20)
        finally:
            state.answers.set()
            relay.kill()
            assert second.stop() == 0
    delivered = sorted(r for c in state.accepted() for r in c.recipients)
    assert delivered == sorted(f"r{n}@example.net" for n in range(6))
