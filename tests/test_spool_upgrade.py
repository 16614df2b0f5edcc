"""A spool written by an older relay (a directory per message: message.eml + envelope.json)
is delivered by this one: converted at start-up, each pending recipient sent once, the
recipients already sent never again, deferred mail kept until its next attempt.

A real `relay serve`, the SES sandbox on loopback; every wait is on a condition.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from relay.spool.record import Envelope, Record
from tests import spoolfile
from tests.conftest import wait_for


def old_message(spool: Path, state: str, qid: str, rcpts: tuple[str, ...], *,
                sent: tuple[str, ...] = (), mtime: float | None = None) -> bytes:
    """Write a message directory as relays before the one-file layout did; its bytes."""
    data = (f"From: a@example.com\r\nTo: {', '.join(rcpts)}\r\nSubject: {qid}\r\n"
            f"Message-ID: <{qid}@old.example>\r\n\r\nwritten by an older relay\r\n").encode()
    record = Record(id=qid, envelope=Envelope("a@example.com", rcpts, time.time() - 60),
                    size=len(data),
                    results={r: {"status": "sent", "at": 1.0, "ses_message_id": "OLD"}
                             for r in sent})
    path = spool / state / qid
    path.mkdir(parents=True)
    (path / "message.eml").write_bytes(data)
    (path / "envelope.json").write_bytes(record.to_json())
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return data


def test_a_spool_in_the_older_layout_is_converted_and_delivered_once(start_relay, sandbox,
                                                                     tmp_path):
    spool = tmp_path / "spool"
    now = time.time()
    ids = [f"{int(now * 1e6) - 1000 + i:013X}00001" for i in range(5)]
    half = old_message(spool, "active", ids[0], ("done@example.net", "left@example.net"),
                       sent=("done@example.net",))
    old_message(spool, "active", ids[1], ("one@example.net",))
    old_message(spool, "deferred", ids[2], ("due@example.net",), mtime=now - 60)
    old_message(spool, "deferred", ids[3], ("later@example.net",), mtime=now + 3600)
    old_message(spool, "hold", ids[4], ("held@example.net",))

    relay = start_relay(sandbox.url)
    wait_for(lambda: sandbox.state.recipients_sent() >= 3)
    wait_for(lambda: relay.queued("active") == [])
    got = sorted(r for c in sandbox.state.accepted() for r in c.recipients)
    assert got == ["due@example.net", "left@example.net", "one@example.net"]
    (first,) = [c for c in sandbox.state.accepted() if c.recipients == ["left@example.net"]]
    assert first.raw == half  # the bytes the older relay accepted, byte for byte

    # what waits is now one file each, its record and next attempt kept
    later = spool / "deferred" / ids[3]
    assert relay.queued("deferred") == [ids[3]] and later.is_file()
    assert abs(later.stat().st_mtime - (now + 3600)) < 1
    assert spoolfile.record(later)["recipients"] == ["later@example.net"]
    assert relay.queued("hold") == [ids[4]] and (spool / "hold" / ids[4]).is_file()
    assert b"written by an older relay" in spoolfile.mime(spool / "hold" / ids[4])
    assert sorted(os.listdir(spool / "deferred")) == [ids[3]]  # nothing half-converted
    assert relay.stop() == 0
    assert sandbox.state.recipients_sent() == 3
