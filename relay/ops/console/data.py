"""What the console's spool pages read, through relay.spool's Queue and Spool only (never a
spool path built here): counts by state and lane, a page of the queue with filters, one
message in full, and the queue verbs (the same Queue methods `relay queue ...` calls).

Bounded on big spools: counts are one directory scan per state; lane counts read at most
LANE_SAMPLE envelopes per state (estimates beyond, marked so); a queue page reads at most
READ_BUDGET envelopes. Synchronous: app.py runs these in a thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relay.spool.queue import STATES, Queue, QueueError, arrival
from relay.spool.record import State

#: envelopes read per state for the lane counts; above it the counts are scaled estimates
LANE_SAMPLE = 200
#: envelopes a filtered queue page reads at most before it offers the next page
READ_BUDGET = 3000
PAGE = 100
#: the states the overview counts (incoming/ is mail being written right now)
COUNTED = (State.INCOMING, *STATES)
#: mail still to send: the oldest message's age is taken over these
WAITING = (State.ACTIVE, State.DEFERRED, State.HOLD)
VERBS = ("retry", "hold", "release", "delete", "requeue")
_QID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def valid_qid(qid: str) -> bool:
    return bool(_QID.fullmatch(qid))


@dataclass(frozen=True)
class Counts:
    states: dict[str, int]
    #: lane -> state -> messages (active, deferred, hold)
    lanes: dict[str, dict[str, int]] = field(default_factory=dict)
    lanes_estimated: bool = False
    #: age in seconds of the oldest message waiting (active, deferred, hold), and its id
    oldest_age: float | None = None
    oldest_id: str = ""


def counts(queue: Queue, *, now: float, lanes: tuple[str, ...] = (),
           sample: int = LANE_SAMPLE) -> Counts:
    """Messages per state (one scandir each, no file read) and per lane (sampled)."""
    spool = queue.spool
    states: dict[str, int] = {}
    by_lane = {ln: {s.value: 0 for s in WAITING} for ln in lanes}
    estimated = False
    oldest: str | None = None
    for state in COUNTED:
        try:
            ids = list(spool.scan(state))
        except FileNotFoundError:
            ids = []
        states[state.value] = len(ids)
        if state not in WAITING or not ids:
            continue
        first = min(ids)
        if arrival(first) is not None and (oldest is None or first < oldest):
            oldest = first
        step = max(1, len(ids) // sample)
        estimated |= step > 1
        picked = ids[::step][:sample] if step > 1 else ids
        scale = len(ids) / len(picked)
        seen: dict[str, int] = {}
        for qid in picked:
            rec = queue.read(state, qid)
            lane = rec.envelope.lane if rec is not None else "?"
            seen[lane] = seen.get(lane, 0) + 1
        for lane, n in seen.items():
            row = by_lane.setdefault(lane, {s.value: 0 for s in WAITING})
            row[state.value] = round(n * scale)
    born = arrival(oldest) if oldest else None
    return Counts(states, by_lane, estimated,
                  max(0.0, now - born) if born is not None else None, oldest or "")


@dataclass(frozen=True)
class Filter:
    state: str = ""
    lane: str = ""
    sender: str = ""
    #: recipient domain
    domain: str = ""
    #: seconds
    min_age: float = 0.0
    #: a piece of the last error (any case)
    error: str = ""
    after: str = ""

    @property
    def reads_envelopes(self) -> bool:
        return bool(self.lane or self.sender or self.domain or self.error)


def _addr_match(address: str, pattern: str) -> bool:
    address, pattern = address.lower(), pattern.strip().lower()
    if pattern.startswith("@"):
        return address.endswith(pattern)
    return address == pattern if "@" in pattern else pattern in address


def _matches(rec: Any, f: Filter) -> bool:
    env = rec.envelope
    if f.lane and env.lane != f.lane:
        return False
    if f.sender and not _addr_match(env.sender, f.sender):
        return False
    if f.domain:
        dom = f.domain.strip().lower().lstrip("@")
        if not any(r.lower().rpartition("@")[2] == dom for r in env.recipients):
            return False
    return not (f.error and f.error.lower() not in rec.last_error.lower())


@dataclass(frozen=True)
class QueuePage:
    rows: list[dict[str, Any]]
    #: the queue id the next page starts after ("" on the last page)
    next_after: str
    #: envelopes read (the filtered scan stops at READ_BUDGET)
    read: int = 0


def queue_page(queue: Queue, f: Filter, *, now: float, limit: int = PAGE,
               budget: int = READ_BUDGET) -> QueuePage:
    """Up to `limit` messages after f.after, oldest first, that pass the filter."""
    states = [State(f.state)] if f.state else list(STATES)
    ids: list[tuple[str, State]] = []
    for state in states:
        try:
            for qid in queue.spool.scan(state):
                if qid > f.after:
                    ids.append((qid, state))
        except FileNotFoundError:
            continue
    if f.min_age:
        ids = [(q, s) for q, s in ids
               if (born := arrival(q)) is None or now - born >= f.min_age]
    ids.sort()
    rows: list[dict[str, Any]] = []
    read = 0
    for n, (qid, state) in enumerate(ids):
        if len(rows) >= limit or read >= budget:
            return QueuePage(rows, ids[n - 1][0] if n else f.after, read)
        if f.reads_envelopes:
            read += 1
            rec = queue.read(state, qid)
            if rec is None or not _matches(rec, f):
                continue
        doc = queue.summary(state, qid, now)
        if doc is not None:
            rows.append(doc)
    return QueuePage(rows, "", read)


def message(queue: Queue, qid: str, *, now: float) -> dict[str, Any]:
    """`relay queue show`'s document, plus the raw header block (at most 64 KB)."""
    doc = queue.show(qid, now=now)
    try:
        raw = queue.spool.read_message(State(doc["state"]), qid)
    except OSError:
        raw = b""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    doc["raw_headers"] = raw[: end if end >= 0 else 65536][:65536].decode(
        "utf-8", "replace")
    return doc


def raw(queue: Queue, qid: str) -> bytes:
    """message.eml exactly as received."""
    state = queue.locate(qid)
    try:
        return queue.spool.read_message(state, qid)
    except OSError as exc:
        raise QueueError(f"{qid}: message.eml unreadable: {exc.strerror or exc}") from None


def act(queue: Queue, verb: str, ids: list[str]) -> list[tuple[str, str, bool]]:
    """One of the queue verbs on the ids, exactly as `relay queue VERB ID...` does it."""
    if verb not in VERBS:
        raise QueueError(f"unknown action {verb!r}; one of: {', '.join(VERBS)}")
    bad = [q for q in ids if not valid_qid(q)]
    if bad:
        raise QueueError(f"{bad[0]!r} is not a queue id")
    results: list[tuple[str, str, bool]] = getattr(queue, verb)(ids, total=len(ids))
    return results
