"""What the console reads from a real spool (files only): counts by state and lane, pages
of the queue by filter, the raw headers, and the queue verbs shared with `relay queue`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from relay.ops.console import data
from relay.spool.queue import Queue, QueueError
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    s = Spool(tmp_path / "spool", fsync=False)
    s.ensure()
    return Queue(s)


def put(q: Queue, state: State = State.ACTIVE, *, sender: str = "a@x.example",
        rcpts: tuple[str, ...] = ("b@y.example",), lane: str = "transactional") -> str:
    env = Envelope(sender, rcpts, time.time(), lane=lane)
    qid = q.spool.accept(env, b"Subject: hello\r\nX-Test: 1\r\n\r\nbody\r\n")
    if state is not State.ACTIVE:
        q.spool.move(qid, State.ACTIVE, state)
    return qid


def test_counts_by_state_and_lane_and_the_oldest(queue):
    first = put(queue, State.DEFERRED)
    put(queue, State.ACTIVE, lane="bulk")
    put(queue, State.HOLD)
    put(queue, State.FAILED)
    c = data.counts(queue, now=time.time(), lanes=("transactional", "bulk"))
    assert c.states == {"incoming": 0, "active": 1, "deferred": 1, "hold": 1, "failed": 1,
                        "corrupt": 0}
    assert c.lanes["bulk"]["active"] == 1 and c.lanes["transactional"]["deferred"] == 1
    assert c.oldest_id == first and not c.lanes_estimated


def test_lane_counts_are_sampled_and_marked_on_a_big_state(queue):
    for _ in range(30):
        put(queue, lane="bulk")
    c = data.counts(queue, now=time.time(), lanes=("bulk",), sample=10)
    assert c.lanes_estimated and c.lanes["bulk"]["active"] == 30
    assert c.states["active"] == 30


def test_pages_go_on_after_the_last_id_and_end(queue):
    ids = sorted(put(queue) for _ in range(7))
    p1 = data.queue_page(queue, data.Filter(), now=time.time(), limit=3)
    assert [r["id"] for r in p1.rows] == ids[:3] and p1.next_after == ids[2]
    p2 = data.queue_page(queue, data.Filter(after=p1.next_after), now=time.time(), limit=3)
    p3 = data.queue_page(queue, data.Filter(after=p2.next_after), now=time.time(), limit=3)
    assert [r["id"] for r in p2.rows + p3.rows] == ids[3:] and p3.next_after == ""


def test_filters_by_state_lane_sender_domain_and_error(queue):
    a = put(queue, State.DEFERRED, sender="app@shop.example", rcpts=("x@gmail.example",))
    b = put(queue, State.DEFERRED, lane="bulk", rcpts=("y@other.example",))
    put(queue, State.HOLD)
    rec = queue.read(State.DEFERRED, a)
    assert rec is not None
    rec.last_error = "Throttling: slow down"
    queue.spool.save(State.DEFERRED, rec)

    def ids(**kw):
        return [r["id"] for r in data.queue_page(queue, data.Filter(**kw), now=time.time()).rows]

    assert ids(state="deferred") == sorted([a, b])
    assert ids(lane="bulk") == [b]
    assert ids(sender="@shop.example") == [a]
    assert ids(domain="gmail.example") == [a]
    assert ids(error="throttling") == [a]
    assert ids(min_age=3600) == []


def test_a_filtered_page_stops_at_its_read_budget_and_offers_the_rest(queue):
    ids = sorted(put(queue) for _ in range(5))
    pg = data.queue_page(queue, data.Filter(lane="bulk"), now=time.time(), budget=2)
    assert pg.rows == [] and pg.read == 2 and pg.next_after == ids[1]


def test_message_has_the_raw_headers(queue):
    qid = put(queue)
    doc = data.message(queue, qid, now=time.time())
    assert "X-Test: 1" in doc["raw_headers"] and "body" not in doc["raw_headers"]
    assert data.raw(queue, qid).endswith(b"body\r\n")


def test_actions_are_the_queue_verbs(queue):
    qid = put(queue, State.DEFERRED)
    assert data.act(queue, "hold", [qid]) == [(qid, "deferred -> hold", True)]
    assert queue.spool.locate(qid) is State.HOLD
    [(_, why, ok)] = data.act(queue, "retry", [qid])
    assert not ok and "release" in why
    with pytest.raises(QueueError):
        data.act(queue, "explode", [qid])
    with pytest.raises(QueueError):
        data.act(queue, "delete", ["../active"])


def test_a_page_over_every_state_is_in_arrival_order_with_each_ones_state(queue):
    placed = {put(queue, state): state.value for state in
              (State.HOLD, State.ACTIVE, State.FAILED, State.DEFERRED, State.ACTIVE)}
    rows = data.queue_page(queue, data.Filter(), now=time.time()).rows
    assert [(r["id"], r["state"]) for r in rows] == sorted(placed.items())


def test_a_listing_is_reused_only_while_its_directory_is_unchanged(queue):
    ids = data.SortedIds(queue)
    first = put(queue)
    past = time.time() - 10
    os.utime(queue.spool.dir(State.ACTIVE), (past, past))
    assert ids(State.ACTIVE) == [first]
    assert ids(State.ACTIVE) is ids(State.ACTIVE)  # kept: the directory did not change
    second = put(queue)  # a rename into active/ changes its mtime
    assert ids(State.ACTIVE) == [first, second]
