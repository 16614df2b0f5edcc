"""What the console's spool pages read, through relay.spool's Queue and Spool only (never a
spool path built here): counts by state and lane, a page of the queue with filters, one
message in full, and the queue verbs (the same Queue methods `relay queue ...` calls).

Bounded on big spools: counts are one directory listing per state (kept while the
directory is unchanged: SortedIds); lane counts read at most LANE_SAMPLE envelopes per
state (estimates beyond, marked so); a filtered queue page reads at most READ_BUDGET
envelopes. Synchronous: relay.ops.console.pages runs these in a thread.
"""

from __future__ import annotations

import bisect
import heapq
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from relay.spool.queue import STATES, Queue, QueueError, arrival
from relay.spool.record import State

#: envelopes read per state for the lane counts; above it the counts are scaled estimates
LANE_SAMPLE = 60
#: envelopes a filtered queue page reads at most before it offers the next page, and
#: the seconds it spends reading them
READ_BUDGET = 2000
READ_SECONDS = 0.1
PAGE = 100
#: the states the overview counts (incoming/ is mail being written right now)
COUNTED = (State.INCOMING, *STATES)
#: mail still to send: the oldest message's age is taken over these
WAITING = (State.ACTIVE, State.DEFERRED, State.HOLD)
VERBS = ("retry", "hold", "release", "delete", "requeue")
_QID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def valid_qid(qid: str) -> bool:
    return bool(_QID.fullmatch(qid))


class SortedIds:
    """Each state's queue ids, sorted, read again only when the directory changed.

    A directory's mtime changes with every entry renamed in or out; a listing is reused
    only when it was read over RACY seconds after that mtime, so a change in the same
    clock tick as the read is never missed (git's racy-timestamp rule).
    """

    RACY = 1.0

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._cache: dict[State, tuple[int, list[str]]] = {}

    def __call__(self, state: State, *, ordered: bool = True) -> list[str]:
        """The state's queue ids, sorted; ordered=False may skip the sort when the listing
        is not kept anyway (counts need no order)."""
        spool = self.queue.spool
        try:
            st = spool.dir(state).stat()
        except FileNotFoundError:
            return []
        hit = self._cache.get(state)
        if hit is not None and hit[0] == st.st_mtime_ns:
            return hit[1]
        read_at = time.time()
        ids = list(spool.scan(state))
        keep = read_at - st.st_mtime > self.RACY
        if keep or ordered:
            ids.sort()
        if keep:
            self._cache[state] = (st.st_mtime_ns, ids)
        else:
            self._cache.pop(state, None)
        return ids


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
           sample: int = LANE_SAMPLE, ids: SortedIds | None = None) -> Counts:
    """Messages per state (a directory listing each, no file read) and per lane (read
    from at most `sample` envelopes per state, evenly spread; scaled estimates beyond)."""
    listing = ids or SortedIds(queue)
    states: dict[str, int] = {}
    by_lane = {ln: {s.value: 0 for s in WAITING} for ln in lanes}
    estimated = False
    oldest: str | None = None
    for state in COUNTED:
        # a directory that keeps changing is listed in directory order: no sort to pay for
        names = listing(state, ordered=False)
        states[state.value] = len(names)
        if state not in WAITING or not names:
            continue
        first = min(names)
        if arrival(first) is not None and (oldest is None or first < oldest):
            oldest = first
        step = len(names) / sample if len(names) > sample else 1.0
        estimated |= step > 1.0
        picked = [names[int(i * step)] for i in range(min(sample, len(names)))]
        seen: dict[str, int] = {}
        for qid in picked:
            rec = queue.read(state, qid)
            lane = rec.envelope.lane if rec is not None else "?"
            seen[lane] = seen.get(lane, 0) + 1
        for lane, n in seen.items():
            row = by_lane.setdefault(lane, {s.value: 0 for s in WAITING})
            row[state.value] = round(n * step)
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


def _after(names: list[str], state: State, after: str, cutoff: str
           ) -> Iterator[tuple[str, State]]:
    """(queue id, state) of the sorted names after `after`, arrived by `cutoff` if given."""
    for qid in names[bisect.bisect_right(names, after):]:
        if cutoff and qid[:13] > cutoff:
            continue
        yield qid, state


def queue_page(queue: Queue, f: Filter, *, now: float, limit: int = PAGE,
               budget: int = READ_BUDGET, ids: SortedIds | None = None) -> QueuePage:
    """Up to `limit` messages after f.after, oldest first, that pass the filter; a filter
    that reads envelopes stops after `budget` reads or READ_SECONDS, and the page's
    next_after goes on from there."""
    listing = ids or SortedIds(queue)
    states = [State(f.state)] if f.state else list(STATES)
    # queue ids sort by arrival: "older than" is a string comparison, no file read
    cutoff = f"{max(0, int((now - f.min_age) * 1e6)):013X}" if f.min_age else ""
    runs = [_after(listing(state), state, f.after, cutoff) for state in states]
    rows: list[dict[str, Any]] = []
    read, last = 0, f.after
    deadline = time.monotonic() + READ_SECONDS
    for qid, state in heapq.merge(*runs):
        if len(rows) >= limit:
            return QueuePage(rows, last, read)
        if f.reads_envelopes:
            if read >= budget or (read % 50 == 0 and time.monotonic() > deadline):
                return QueuePage(rows, last, read)
            read += 1
            rec = queue.read(state, qid)
            last = qid
            if rec is None or not _matches(rec, f):
                continue
        last = qid
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
    """The raw message exactly as received (the spool file after its record line)."""
    state = queue.locate(qid)
    try:
        return queue.spool.read_message(state, qid)
    except OSError as exc:
        raise QueueError(f"{qid}: message unreadable: {exc.strerror or exc}") from None


def act(queue: Queue, verb: str, ids: list[str]) -> list[tuple[str, str, bool]]:
    """One of the queue verbs on the ids, exactly as `relay queue VERB ID...` does it."""
    if verb not in VERBS:
        raise QueueError(f"unknown action {verb!r}; one of: {', '.join(VERBS)}")
    bad = [q for q in ids if not valid_qid(q)]
    if bad:
        raise QueueError(f"{bad[0]!r} is not a queue id")
    results: list[tuple[str, str, bool]] = getattr(queue, verb)(ids, total=len(ids))
    return results
