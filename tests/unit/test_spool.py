"""The spool: durable accept, atomic state changes, recovery, queue ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay.errors import SpoolFullError
from relay.spool.files import whole_filesystem
from relay.spool.reading import CorruptMessage
from relay.spool.record import Envelope, Record, State, new_queue_id
from relay.spool.spool import Spool

ENV = Envelope(sender="a@example.com",
               recipients=("b@example.net", "c@example.net", "b@example.net"),
               received_at=1000.0, client="127.0.0.1", helo="h")


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


def test_accept_writes_one_file_its_record_line_then_the_mime_as_received(spool):
    data = b"Subject: x\r\n\r\nbody\r\n.\r\n\x00\xff"
    qid = spool.accept(ENV, data)
    path = spool.path(State.ACTIVE, qid)
    line, mime = path.read_bytes().split(b"\n", 1)
    assert mime == data  # `tail -n +2` gives the message byte for byte
    doc = json.loads(line)
    assert doc["sender"] == "a@example.com" and doc["size"] == len(data) and doc["id"] == qid
    assert spool.read(State.ACTIVE, qid)[1] == data
    assert list(spool.scan(State.INCOMING)) == []
    assert spool.locate(qid) is State.ACTIVE


def test_accept_refuses_below_min_free_and_leaves_nothing(tmp_path):
    s = Spool(tmp_path / "spool", min_free_bytes=1 << 60)
    s.ensure()
    with pytest.raises(SpoolFullError):
        s.accept(ENV, b"x")
    for state in State:
        assert list(s.scan(state)) == []


def test_recover_discards_half_written_messages(spool):
    half = spool.path(State.INCOMING, new_queue_id())
    half.write_bytes(b'{"id": "half", "sen')
    (spool.dir(State.INCOMING) / "old-layout").mkdir()
    (spool.dir(State.INCOMING) / "old-layout" / "message.eml").write_bytes(b"Subject: half")
    (spool.dir(State.INCOMING) / "stray").write_text("x")
    qid = spool.accept(ENV, b"whole")
    assert spool.recover() == 3
    assert list(spool.scan(State.INCOMING)) == []
    assert list(spool.scan(State.ACTIVE)) == [qid]


def test_state_changes_are_renames_and_deferred_mtime_is_next_attempt(spool):
    qid = spool.accept(ENV, b"m")
    spool.move(qid, State.ACTIVE, State.DEFERRED, when=5000.0)
    assert spool.locate(qid) is State.DEFERRED
    assert list(spool.due(4999.0)) == []
    assert list(spool.due(5000.0)) == [qid]
    spool.move(qid, State.DEFERRED, State.HOLD)
    assert spool.locate(qid) is State.HOLD
    spool.discard(State.HOLD, qid)
    assert spool.locate(qid) is None
    assert not any(spool.dir(State.INCOMING).iterdir())


def test_save_replaces_the_record_atomically(spool):
    qid = spool.accept(ENV, b"m")
    rec = spool.load(State.ACTIVE, qid)
    rec.results["b@example.net"] = {"status": "sent", "ses_message_id": "X"}
    rec.attempts = 2
    spool.save(State.ACTIVE, rec)
    again = spool.load(State.ACTIVE, qid)
    assert again.attempts == 2 and again.pending() == ["c@example.net"]
    assert spool.read(State.ACTIVE, qid)[1] == b"m"
    assert list(spool.scan(State.ACTIVE)) == [qid]
    assert os.listdir(spool.dir(State.INCOMING)) == []  # no temporary file left


def test_pending_keeps_order_and_dedupes():
    rec = Record(id="x", envelope=ENV, size=1)
    assert rec.pending() == ["b@example.net", "c@example.net"]


def test_unreadable_record_goes_to_corrupt_with_its_reason(spool):
    qid = spool.accept(ENV, b"m")
    spool.path(State.ACTIVE, qid).write_bytes(b"{not json\nm")
    with pytest.raises(CorruptMessage):
        spool.load(State.ACTIVE, qid)
    assert spool.locate(qid) is State.CORRUPT
    corrupt = spool.path(State.CORRUPT, qid)
    assert (corrupt / qid).read_bytes() == b"{not json\nm"  # kept as it was
    assert "record line unreadable" in (corrupt / "reason.txt").read_text()


def test_a_truncated_message_goes_to_corrupt_never_to_delivery(spool):
    qid = spool.accept(ENV, b"Subject: x\r\n\r\nbody\r\n")
    with open(spool.path(State.ACTIVE, qid), "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    assert spool.load(State.ACTIVE, qid).size == 20  # the record alone is still readable
    with pytest.raises(CorruptMessage, match="message is 16 bytes, its record says 20"):
        spool.read(State.ACTIVE, qid)
    assert spool.locate(qid) is State.CORRUPT


def test_save_keeps_the_mime_byte_for_byte_whatever_the_record_grows_to(spool):
    data = bytes(range(256)) * 300 + b"\n\n{}"
    qid = spool.accept(ENV, data)
    rec = spool.load(State.ACTIVE, qid)
    for i in range(3000):  # a record line far longer than one read block
        rec.results[f"r{i}@example.net"] = {"status": "sent", "ses_message_id": "X" * 10}
    spool.save(State.ACTIVE, rec)
    again, mime = spool.read(State.ACTIVE, qid)
    assert mime == data and len(again.results) == 3000
    assert spool.read_head(State.ACTIVE, qid, 10) == data[:10]
    rec.results.clear()
    spool.save(State.ACTIVE, rec)
    assert spool.read(State.ACTIVE, qid)[1] == data


def test_a_flush_syncs_and_closes_every_file_it_was_left(spool):
    qids = [spool.prepare(ENV, b"m") for _ in range(3)]
    fds = list(spool._files)
    assert len(fds) == 3 and State.ACTIVE not in spool._dirs
    spool.flush()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    for qid in qids:
        spool.publish(qid)
    assert spool._dirs == {State.ACTIVE}
    spool.flush()
    assert spool._files == [] and spool._dirs == set()


def test_queue_ids_are_unique_and_sortable():
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_a_spool_flushes_by_syncfs_only_on_a_filesystem_of_its_own(spool, tmp_path):
    """syncfs would flush every other program's writes on a shared filesystem."""
    spool.prepare(ENV, b"m")
    spool.flush()
    assert spool.syncfs is False  # a directory of the test's filesystem: file by file
    assert whole_filesystem(Path("/")) and not whole_filesystem(tmp_path)


def test_read_message_without_its_record_only_reads_and_never_moves(spool):
    """A read-only view (the console, a DSN) looks; delivery's read() decides on corrupt."""
    qid = spool.accept(ENV, b"Subject: x\r\n\r\nbody\r\n")
    with open(spool.path(State.ACTIVE, qid), "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    assert spool.read_message(State.ACTIVE, qid) == b"Subject: x\r\n\r\nbo"
    assert spool.locate(qid) is State.ACTIVE
    spool.path(State.ACTIVE, qid).write_bytes(b"no record line")
    with pytest.raises(OSError, match="no record line"):
        spool.read_message(State.ACTIVE, qid)
    assert spool.locate(qid) is State.ACTIVE
