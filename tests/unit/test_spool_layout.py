"""The one-file layout: older message directories converted at start-up (whatever instant a
crash interrupted a conversion), and a record rewrite that never races an operator's move
into two copies."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from relay.spool import legacy
from relay.spool.files import MAX_PENDING_FILES
from relay.spool.queue import Queue
from relay.spool.record import Envelope, Record, State
from relay.spool.spool import Spool
from tests.conftest import wait_for

ENV = Envelope(sender="a@example.com", recipients=("b@example.net", "c@example.net"),
               received_at=1000.0, client="127.0.0.1", helo="h", lane="bulk")
DATA = b"Subject: old\r\nMessage-ID: <old@x>\r\n\r\nbody\r\n\x00\xff"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


def old_message(spool: Spool, state: State, qid: str, *, data: bytes = DATA,
                mtime: float | None = None) -> Record:
    """A message directory as relays before the one-file layout wrote it."""
    record = Record(id=qid, envelope=ENV, size=len(data), attempts=2,
                    results={"b@example.net": {"status": "sent", "ses_message_id": "S1"}})
    path = spool.path(state, qid)
    path.mkdir()
    (path / "message.eml").write_bytes(data)
    (path / "envelope.json").write_bytes(record.to_json())
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return record


def test_recover_converts_old_message_directories_keeping_record_mime_and_next_attempt(spool):
    a = old_message(spool, State.ACTIVE, "00000000000A1" + "00001")
    d = old_message(spool, State.DEFERRED, "00000000000A2" + "00001", mtime=4_000_000_000.0)
    h = old_message(spool, State.HOLD, "00000000000A3" + "00001")
    spool.recover()
    assert spool.converted == 3
    for state, rec in ((State.ACTIVE, a), (State.DEFERRED, d), (State.HOLD, h)):
        path = spool.path(state, rec.id)
        assert path.is_file()
        again, mime = spool.read(state, rec.id)
        assert mime == DATA and again == rec and again.pending() == ["c@example.net"]
        assert sorted(os.listdir(spool.dir(state))) == [rec.id]  # nothing left over
    assert list(spool.due(3_999_999_999.0)) == []
    assert list(spool.due(4_000_000_000.0)) == [d.id]
    spool.recover()
    assert spool.converted == 3  # nothing left to convert


def test_old_directories_are_read_where_they_are_before_any_start_up(spool):
    rec = old_message(spool, State.DEFERRED, "00000000000B1" + "00001")
    assert spool.locate(rec.id) is State.DEFERRED
    assert spool.load(State.DEFERRED, rec.id) == rec
    assert spool.read(State.DEFERRED, rec.id)[1] == DATA
    doc = Queue(spool).show(rec.id)
    assert doc["headers"]["Message-ID"] == "<old@x>" and doc["pending"] == 1
    Queue(spool).requeue([rec.id])  # converted on the way, then rewritten
    assert spool.path(State.ACTIVE, rec.id).is_file()
    assert spool.read(State.ACTIVE, rec.id)[1] == DATA


def _crash_after(step: int, spool: Spool, qid: str) -> None:
    """The state a conversion of active/<qid> leaves when the process dies after `step`."""
    d = spool.dir(State.ACTIVE)
    new, old, target = d / f".{qid}.new", d / f".{qid}.old", d / qid
    record = legacy.read_record(target)
    if step == 0:  # inside step 1: half the new file written
        new.write_bytes(record.to_head()[:20])
        return
    new.write_bytes(record.to_head() + DATA)
    if step >= 2:
        os.rename(target, old)
    if step >= 3:
        os.rename(new, target)


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_a_conversion_cut_short_at_any_step_is_finished_with_the_message_once(spool, step):
    rec = old_message(spool, State.ACTIVE, "00000000000C1" + "00001")
    _crash_after(step, spool, rec.id)
    spool.recover()
    assert os.listdir(spool.dir(State.ACTIVE)) == [rec.id]
    assert spool.read(State.ACTIVE, rec.id) == (rec, DATA)


def test_an_unreadable_old_directory_is_left_for_delivery_to_put_in_corrupt(spool):
    qid = "00000000000D1" + "00001"
    old_message(spool, State.ACTIVE, qid)
    (spool.path(State.ACTIVE, qid) / "envelope.json").write_text("{not json")
    spool.recover()
    assert spool.path(State.ACTIVE, qid).is_dir()
    with pytest.raises(Exception, match="envelope.json unreadable"):
        spool.load(State.ACTIVE, qid)
    assert spool.locate(qid) is State.CORRUPT


def blocked_on(path: Path) -> bool:
    """Someone waits for the flock on this file (a "->" line of /proc/locks)."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any("->" in line and f":{ino} " in line for line in f)


def test_a_save_racing_an_operators_move_lands_in_the_moved_file_never_in_a_second(spool):
    """The pool rewrites a record (a rename over the file) while an operator holds the
    message (a rename away): without the lock and its second look, the rewrite would
    recreate active/<qid> beside hold/<qid>, and both would be sent."""
    qid = spool.accept(ENV, DATA)
    rec = spool.load(State.ACTIVE, qid)
    rec.results["c@example.net"] = {"status": "sent", "ses_message_id": "S2"}
    saved: list[State] = []
    with spool.locked(State.ACTIVE, qid):
        saver = threading.Thread(target=lambda: saved.append(spool.save(State.ACTIVE, rec)))
        saver.start()
        wait_for(lambda: blocked_on(spool.path(State.ACTIVE, qid)))  # the operator's lock
        os.rename(spool.path(State.ACTIVE, qid), spool.path(State.HOLD, qid))
    saver.join(30)
    assert saved == [State.HOLD]
    assert not spool.exists(State.ACTIVE, qid)
    assert spool.read(State.HOLD, qid) == (rec, DATA)


def test_an_operators_delete_during_a_save_is_never_undone(spool):
    qid = spool.accept(ENV, DATA)
    rec = spool.load(State.ACTIVE, qid)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            spool.save(State.ACTIVE, rec)
        except FileNotFoundError as exc:
            errors.append(exc)

    with spool.locked(State.ACTIVE, qid):
        saver = threading.Thread(target=save)
        saver.start()
        wait_for(lambda: blocked_on(spool.path(State.ACTIVE, qid)))
        os.unlink(spool.path(State.ACTIVE, qid))
    saver.join(30)
    assert len(errors) == 1 and spool.locate(qid) is None
    assert os.listdir(spool.dir(State.INCOMING)) == []


def test_a_due_scan_never_moves_a_deferred_file_a_save_is_rewriting(spool):
    """Unsaved's retry rewrites deferred/<qid> under the lock while the scheduler's scan
    finds it due: a rename into active/ then would let the rewrite recreate
    deferred/<qid>, two copies and the recipients sent twice. The scan skips it until
    the rewrite is done, and takes the rewritten file on its next pass."""
    qid = spool.accept(ENV, DATA)
    spool.move(qid, State.ACTIVE, State.DEFERRED, when=1.0)
    rec = spool.load(State.DEFERRED, qid)
    rec.results["c@example.net"] = {"status": "sent", "ses_message_id": "S2"}
    with spool.locked(State.DEFERRED, qid) as fd:  # what save holds while it rewrites
        assert spool.activate([qid]) == []
        spool.replace(State.DEFERRED, fd, rec)
    assert spool.locate(qid) is State.DEFERRED and not spool.exists(State.ACTIVE, qid)
    assert spool.activate([qid]) == [qid]
    assert os.listdir(spool.dir(State.DEFERRED)) == []
    assert spool.read(State.ACTIVE, qid) == (rec, DATA)


def test_a_crowded_spool_never_syncs_a_file_on_the_event_loop(spool):
    """Past MAX_PENDING_FILES files waiting for a flush, a file written in a thread syncs
    itself (bounding the descriptors kept), but one written on the loop (inline, after
    the ingress saw crowded() false) only joins the flush: no fdatasync on the loop."""
    for _ in range(MAX_PENDING_FILES):
        spool.prepare(ENV, DATA)
    assert spool.crowded()
    spool.prepare(ENV, DATA, inline=True)
    assert len(spool._files) == MAX_PENDING_FILES + 1  # left for the flush
    spool.prepare(ENV, DATA)
    assert len(spool._files) == MAX_PENDING_FILES + 1  # synced itself, closed
    spool.flush()
    assert not spool.crowded() and spool._files == []


def test_the_queue_lists_a_file_it_cannot_read_with_the_reason(spool):
    qid = spool.accept(ENV, DATA)
    spool.move(qid, State.ACTIVE, State.HOLD)
    spool.path(State.HOLD, qid).write_bytes(b"not a record\n")
    [row] = list(Queue(spool).entries())
    assert row["id"] == qid and row["state"] == "hold" and row["error"] == "record unreadable"
