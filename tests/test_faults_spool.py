"""The spool under faults: a result that cannot be saved stops the message, never repeats it.

A real `relay serve` whose spool lives on a small tmpfs mount (root only: skipped with the
reason otherwise, unmounted at the end) that fills while SendEmail answers are held by the
sandbox; real SMTP clients; /readyz read over HTTP. Every wait is on a condition.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.sandbox.server import SandboxState, SandboxThread
from relay.spool.record import Envelope, Record, State
from relay.spool.spool import Spool
from tests.conftest import PG_SERVER, ROOT, RelayProcess, relay_sections, wait_for
from tests.test_delivery import msg, readyz, send_many, spool_empty


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs of the test's own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the spool needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem with")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True,
                   timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def fill(path: Path) -> int:
    """Write into `path` until its filesystem has no room left; the bytes written."""
    size, written = 65536, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(100_000):  # bounded: the mount is 4 MB
            try:
                written += os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if size == 1:
                    return written
                size //= 2  # the last pages too
    finally:
        os.close(fd)
    raise AssertionError("the filesystem never filled")


def duplicated(state: SandboxState) -> list[str]:
    """Recipients SES accepted more than once."""
    sent = Counter(r for c in state.accepted() for r in c.recipients)
    return sorted(r for r, n in sent.items() if n > 1)


def tries(relay: RelayProcess) -> int:
    """How many times the relay has tried to save the results it keeps, from /readyz."""
    code, body = readyz(relay)
    if code != 503 or "cannot record delivery results" not in body:
        return 0
    return int(body.split(" tries to save")[0].rsplit(", ", 1)[1])


def test_disk_full_during_multi_call_messages_sends_no_recipient_twice(tmp_path, small_disk):
    """0 duplicates, 0 lost, /readyz 503 while full, all delivered once space returns."""
    state = SandboxState(max_send_rate=1000, max_24hour_send=-1, keep_raw=False)
    messages = [[f"m{n}r{i:02d}@example.net" for i in range(70)] for n in range(8)]
    sections = relay_sections(tmp_path, "", spool={"dir": str(small_disk / "spool")})
    if not PG_SERVER:  # the database on the big disk: only the spool fills
        sections["database"] = {"url": f"sqlite:///{tmp_path / 'relay.db'}"}
    with SandboxThread(state) as sb:
        sections["ses"]["endpoint_url"] = sb.url
        relay = RelayProcess(tmp_path, sections)
        try:
            relay.start()
            state.answers.clear()  # every first call waits in the sandbox
            send_many(relay.smtp_port, [(r, msg(n, r)) for n, r in enumerate(messages)])
            wait_for(lambda: state.inflight == len(messages), 30)
            fill(small_disk / "filler")
            wait_for(lambda: readyz(relay)[0] == 503, 10)
            assert "is full" in readyz(relay)[1]
            state.answers.set()  # SES accepts the first 50 of each: none can be saved

            wait_for(lambda: tries(relay) >= 3 or duplicated(state), 30)
            assert duplicated(state) == []
            wait_for(lambda: state.inflight == 0, 10)
            calls = len(state.calls)
            assert state.recipients_sent() == 50 * len(messages)
            wait_for(lambda: tries(relay) >= 8 or duplicated(state), 30)
            # nothing at all was sent while the spool could not be written
            assert len(state.calls) == calls
            assert relay.find("spool_unwritable") is not None
            assert len(relay.events("spool_unwritable")) == 1  # one line per outage

            (small_disk / "filler").unlink()
            wait_for(lambda: state.recipients_sent() >= 70 * len(messages), 30)
            wait_for(lambda: spool_empty(relay), 20)
            wait_for(lambda: readyz(relay)[0] == 200, 10)
            assert relay.find("spool_writable_again") is not None
        finally:
            state.answers.set()
            relay.stop()
    expected = {r for rcpts in messages for r in rcpts}
    assert {r for c in state.accepted() for r in c.recipients} == expected  # 0 lost
    assert duplicated(state) == []


def test_a_second_relay_on_the_same_spool_stops_at_once_and_touches_nothing(
        start_relay, sandbox, tmp_path):
    first = start_relay(sandbox.url)
    unfinished = first.spool / "incoming" / "0000000000000ABCDE"
    unfinished.mkdir()  # as if a session of the first relay were writing it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(first.config)],
                         cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)), timeout=60,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert str(first.spool) in lines[0] and f"pid {first.proc.pid}" in lines[0], lines[0]
    assert unfinished.is_dir()  # incoming/ untouched
    assert first.proc.poll() is None
    # started on the first one's port too: the cause named is the spool, not the port
    same_port = dict(env, PYTHONPATH=str(ROOT), RELAY_SMTP__PORT=str(first.smtp_port))
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(first.config)],
                         cwd=tmp_path, env=same_port, timeout=60,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and f"pid {first.proc.pid}" in out.stderr, out.stderr
    assert unfinished.is_dir() and first.proc.poll() is None


def test_entries_that_are_not_messages_go_to_corrupt_once_and_never_to_ses(
        start_relay, sandbox, tmp_path):
    relay = start_relay(sandbox.url)
    spool = Spool(relay.spool, fsync=False)
    env = Envelope("app@example.com", ("x@example.net",), time.time())
    data = msg("bad", ["x@example.net"])
    no_message = spool.prepare(env, data)
    with open(spool.path(State.INCOMING, no_message), "r+b") as f:
        f.truncate(f.read().index(b"\n") + 1)  # its record line alone
    truncated = spool.prepare(env, data)
    with open(spool.path(State.INCOMING, truncated), "r+b") as f:
        f.truncate(f.seek(0, 2) - len(data) // 2)
    (relay.spool / "incoming" / "stray").write_text("left here by someone\n")
    for qid in (no_message, truncated):
        spool.publish(qid)
    os.rename(relay.spool / "incoming" / "stray", relay.spool / "active" / "stray.txt")
    # a message directory of the older layout that lost its message.eml after start-up
    old = relay.spool / "incoming" / "0000000000001ABCDE"
    old.mkdir()
    (old / "envelope.json").write_bytes(
        Record(id=old.name, envelope=env, size=len(data)).to_json())
    os.rename(old, relay.spool / "active" / old.name)

    bad = sorted([no_message, truncated, "stray.txt", old.name])
    wait_for(lambda: relay.queued("corrupt") == bad, 20)
    reasons = {q: (relay.spool / "corrupt" / q / "reason.txt").read_text() for q in bad}
    assert f"message is 0 bytes, its record says {len(data)}" in reasons[no_message]
    assert f"message is {len(data) - len(data) // 2} bytes, its record says {len(data)}" in (
        reasons[truncated])
    assert "record line unreadable" in reasons["stray.txt"]
    assert "message.eml missing" in reasons[old.name]
    assert (relay.spool / "corrupt" / "stray.txt" / "stray.txt").read_text().startswith("left")
    assert (relay.spool / "corrupt" / old.name / "envelope.json").exists()

    # a good message after them goes through; the bad ones were looked at once each
    send_many(relay.smtp_port, [(["good@example.net"], msg("good", ["good@example.net"]))])
    wait_for(lambda: sandbox.state.recipients_sent() == 1 and spool_empty(relay), 20)
    assert [c.recipients for c in sandbox.state.calls] == [["good@example.net"]]
    assert sorted(e["queue_id"] for e in relay.events("corrupt")) == bad
