"""The spool: durable accept, atomic state changes, recovery, queue ids."""

from __future__ import annotations

import json
import os

import pytest

from relay.errors import SpoolFullError
from relay.spool.record import Envelope, Record, State, new_queue_id
from relay.spool.spool import CorruptMessage, Spool

ENV = Envelope(sender="a@example.com",
               recipients=("b@example.net", "c@example.net", "b@example.net"),
               received_at=1000.0, client="127.0.0.1", helo="h")


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


def test_accept_writes_both_files_into_active(spool):
    data = b"Subject: x\r\n\r\nbody\r\n.\r\n\x00\xff"
    qid = spool.accept(ENV, data)
    path = spool.path(State.ACTIVE, qid)
    assert (path / "message.eml").read_bytes() == data
    doc = json.loads((path / "envelope.json").read_text())
    assert doc["sender"] == "a@example.com" and doc["size"] == len(data)
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
    half.mkdir()
    (half / "message.eml").write_bytes(b"Subject: half")
    (spool.dir(State.INCOMING) / "stray").write_text("x")
    qid = spool.accept(ENV, b"whole")
    assert spool.recover() == 2
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
    assert sorted(os.listdir(spool.path(State.ACTIVE, qid))) == ["envelope.json", "message.eml"]


def test_pending_keeps_order_and_dedupes():
    rec = Record(id="x", envelope=ENV, size=1)
    assert rec.pending() == ["b@example.net", "c@example.net"]


def test_unreadable_record_goes_to_corrupt(spool):
    qid = spool.accept(ENV, b"m")
    (spool.path(State.ACTIVE, qid) / "envelope.json").write_text("{not json")
    with pytest.raises(CorruptMessage):
        spool.load(State.ACTIVE, qid)
    assert spool.locate(qid) is State.CORRUPT


def test_queue_ids_are_unique_and_sortable():
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
