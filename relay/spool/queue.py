"""Queue operations for the operator: list, show, stats, retry, hold, release, delete, requeue.

Filesystem-only, safe beside a running `relay serve`: every change is one rename (or
unlink) of a message's file between active/, deferred/, hold/ and failed/, so the delivery
pool either sees a message or does not. Each takes the message's flock (Spool.locked),
like the pool's record rewrites (Spool.save), so an in-flight SendEmail result lands in the
message wherever it was moved, and never recreates one that was moved or deleted. Called
by relay.ops.queue_cli.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from relay.spool import legacy
from relay.spool.record import FAILED, Record, State
from relay.spool.spool import Spool

#: States an operator sees; incoming/ holds only half-written or deleted mail.
STATES = (State.ACTIVE, State.DEFERRED, State.HOLD, State.FAILED, State.CORRUPT)
#: qshape's age buckets (minutes): a message counts in the first bucket it is younger than.
BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
BUCKET_NAMES = ("T", *(str(b) for b in BUCKETS), "1280+")
HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To")

Progress = Callable[[int, int], None]


class QueueError(Exception):
    """An operator command that cannot be done; the message says why."""


def arrival(qid: str) -> float | None:
    """Arrival time from the queue id (13 hex digits of microseconds), with no file read."""
    try:
        return int(qid[:13], 16) / 1e6
    except ValueError:
        return None


def bucket(age: float) -> str:
    minutes = age / 60
    for limit in BUCKETS:
        if minutes < limit:
            return str(limit)
    return "1280+"


def _match(address: str, pattern: str) -> bool:
    """pattern `@domain` matches the domain; anything else the whole address (no case)."""
    address, pattern = address.lower(), pattern.lower()
    if pattern.startswith("@"):
        return address.endswith(pattern)
    return address == pattern


#: (verb, state the message is in) -> what to do instead, for the verbs that do not apply
HINTS: dict[tuple[str, State], str] = {
    ("retry", State.HOLD): "is held: release it to send it now (relay queue release {qid})",
    ("retry", State.FAILED): "has failed for good: requeue it to try again "
                             "(relay queue requeue {qid})",
    ("hold", State.FAILED): "has failed for good and is never sent: nothing to hold "
                            "(relay queue requeue {qid} sends it again)",
    ("release", State.ACTIVE): "is not held: it is active, the delivery pool sends it",
    ("release", State.DEFERRED): "is not held: it is deferred; retry sends it now "
                                 "(relay queue retry {qid})",
    ("release", State.FAILED): "is not held: it has failed for good; requeue it to try "
                               "again (relay queue requeue {qid})",
}


def wrong_state(qid: str, verb: str, state: State, allowed: Iterable[State]) -> str:
    """What an operator reads when a verb does not apply to the message's state: what to
    do instead where there is something, else which states the verb applies to."""
    if state is State.CORRUPT:
        return (f"{qid}: is corrupt (unreadable or not a message): read it with "
                f"relay queue show {qid}, then delete it")
    hint = HINTS.get((verb, state))
    if hint:
        return f"{qid}: {hint.format(qid=qid)}"
    names = ", ".join(s.value for s in allowed)
    return f"{qid}: is {state.value}; {verb} applies to {names}"


class Queue:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    # -- reading --------------------------------------------------------------------

    def locate(self, qid: str) -> State:
        if not qid or "/" in qid or qid.startswith("."):
            raise QueueError(f"{qid!r} is not a queue id")
        state = self.spool.locate(qid)
        if state is None:
            raise QueueError(f"{qid}: no such message in {self.spool.root}")
        return state

    def read(self, state: State, qid: str) -> Record | None:
        """The record, or None when unreadable; never moves anything (unlike Spool.load)."""
        return self.spool.peek(state, qid)

    def summary(self, state: State, qid: str, now: float) -> dict[str, Any] | None:
        path = self.spool.path(state, qid)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None  # moved on meanwhile
        rec = self.read(state, qid)
        born = arrival(qid) or (rec.envelope.received_at if rec else mtime)
        doc: dict[str, Any] = {"id": qid, "state": state.value, "arrival": born,
                               "age": round(max(0.0, now - born), 3)}
        if rec is None:
            if not os.path.lexists(path):
                return None  # moved on between the stat and the read
            doc["error"] = "record unreadable"
            return doc
        doc.update(
            size=rec.size, sender=rec.envelope.sender,
            recipients=len(rec.envelope.recipients), pending=len(rec.pending()),
            attempts=rec.attempts, lane=rec.envelope.lane,
            next_attempt=mtime if state is State.DEFERRED else None,
            last_error=rec.last_error,
        )
        return doc

    def entries(self, *, states: Iterable[State] = STATES, older_than: float = 0.0,
                sender: str = "", recipient: str = "",
                now: float | None = None) -> Iterator[dict[str, Any]]:
        """One summary per message, oldest first within each state."""
        now = time.time() if now is None else now
        for state in states:
            for qid in sorted(self.spool.scan(state)):
                born = arrival(qid)
                if older_than and born is not None and now - born < older_than:
                    continue
                doc = self.summary(state, qid, now)
                if doc is None or (older_than and doc["age"] < older_than):
                    continue
                if sender or recipient:
                    rec = self.read(state, qid)
                    if rec is None:
                        continue
                    if sender and not _match(rec.envelope.sender, sender):
                        continue
                    if recipient and not any(_match(r, recipient)
                                             for r in rec.envelope.recipients):
                        continue
                yield doc

    def show(self, qid: str, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        state = self.locate(qid)
        doc = self.summary(state, qid, now)
        if doc is None:
            raise QueueError(f"{qid}: moved while reading; try again")
        rec = self.read(state, qid)
        path = self.spool.path(state, qid)
        doc["path"] = str(path)
        if path.is_file():
            doc["read"] = f"head -1 {path} (record); tail -n +2 {path} (message)"
        if rec is not None:
            doc["envelope"] = {"sender": rec.envelope.sender,
                               "recipients": list(rec.envelope.recipients),
                               "received_at": rec.envelope.received_at,
                               "client": rec.envelope.client, "helo": rec.envelope.helo,
                               "lane": rec.envelope.lane, "ses": rec.envelope.ses.to_doc()}
            doc["results"] = rec.results
            doc["pending_recipients"] = rec.pending()
        try:
            raw = self.spool.read_head(state, qid)
            head = BytesHeaderParser(policy=compat32).parsebytes(raw, headersonly=True)
            doc["headers"] = {h: str(head[h]) for h in HEADERS if head[h] is not None}
        except OSError as exc:
            doc["headers"] = {}
            doc["error"] = f"message unreadable: {exc}"
        return doc

    def stats(self, *, now: float | None = None, top: int = 10, domains: bool = True,
              sample: int = 0) -> dict[str, Any]:
        """Counts by state and age bucket from directory names alone (no file read),
        plus the top recipient domains of deferred mail (reads deferred envelopes: all
        of them, or an even sample of `sample` across arrival order, counts scaled)."""
        now = time.time() if now is None else now
        table: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        for state in STATES:
            counts = dict.fromkeys(BUCKET_NAMES, 0)
            first: str | None = None
            for qid in self.spool.scan(state):
                counts["T"] += 1
                born = arrival(qid)
                counts[bucket(now - born) if born is not None else "1280+"] += 1
                if born is not None and (first is None or qid < first):
                    first = qid
            table[state.value] = counts
            born_first = arrival(first) if first else None
            oldest[state.value] = round(now - born_first, 3) if born_first else 0.0
        doc: dict[str, Any] = {"states": table, "oldest_age": oldest,
                               "total": sum(c["T"] for c in table.values())}
        if domains:
            ids = sorted(self.spool.scan(State.DEFERRED))
            step = len(ids) / sample if sample and len(ids) > sample else 1.0
            if step > 1.0:
                ids = [ids[int(i * step)] for i in range(sample)]
            doc["deferred_domains"] = self.deferred_domains(ids, now=now, top=top, scale=step)
            doc["deferred_sampled"] = len(ids) if step > 1.0 else 0
        return doc

    def deferred_domains(self, ids: Iterable[str], *, now: float, top: int,
                         scale: float = 1.0) -> list[dict[str, Any]]:
        """qshape-style: pending recipients of deferred mail per domain and age bucket."""
        per: dict[str, Counter[str]] = {}
        for qid in ids:
            rec = self.read(State.DEFERRED, qid)
            if rec is None:
                continue
            born = arrival(qid) or rec.envelope.received_at
            b = bucket(now - born)
            for rcpt in rec.pending():
                c = per.setdefault(rcpt.rpartition("@")[2].lower(), Counter())
                c["T"] += 1
                c[b] += 1
        best = sorted(per.items(), key=lambda kv: (-kv[1]["T"], kv[0]))[:top]
        return [{"domain": d, **{name: round(c.get(name, 0) * scale) for name in BUCKET_NAMES}}
                for d, c in best]

    # -- changes --------------------------------------------------------------------

    def _rename(self, qid: str, src: State, dst: State, *, when: float | None = None) -> None:
        self.spool.move(qid, src, dst, when=when)

    def _each(self, ids: Iterable[str], one: Callable[[str], str],
              progress: Progress | None, total: int) -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        for n, qid in enumerate(ids, 1):
            try:
                out.append((qid, one(qid), True))
            except QueueError as exc:
                out.append((qid, str(exc), False))
            if progress is not None:
                progress(n, total)
        return out

    def _moving(self, qid: str, allowed: tuple[State, ...], dst: State, verb: str,
                when: float | None = None) -> str:
        """Rename qid from whichever allowed state it is in to dst; a message the pool
        moves at the same instant is looked up again (a rename either wins or not)."""
        for _ in range(5):
            state = self.locate(qid)
            if state is dst:
                return f"already {dst.value}"
            if state not in allowed:
                raise QueueError(wrong_state(qid, verb, state, allowed))
            try:
                self._rename(qid, state, dst, when=when)
            except FileNotFoundError:
                continue
            return f"{state.value} -> {dst.value}"
        raise QueueError(f"{qid}: kept moving; try again")

    def retry(self, ids: Iterable[str], *, progress: Progress | None = None,
              total: int = 0) -> list[tuple[str, str, bool]]:
        """Deferred mail due now: back to active/, where the pool takes it at its next scan."""
        return self._each(ids, lambda q: self._moving(q, (State.DEFERRED,), State.ACTIVE,
                                                      "retry"), progress, total)

    def hold(self, ids: Iterable[str], *, progress: Progress | None = None,
             total: int = 0) -> list[tuple[str, str, bool]]:
        """Out of the pool's reach; an SES call already in flight still records its result."""
        return self._each(ids, lambda q: self._moving(q, (State.ACTIVE, State.DEFERRED),
                                                      State.HOLD, "hold"), progress, total)

    def release(self, ids: Iterable[str], *, progress: Progress | None = None,
                total: int = 0) -> list[tuple[str, str, bool]]:
        return self._each(ids, lambda q: self._moving(q, (State.HOLD,), State.ACTIVE,
                                                      "release"), progress, total)

    def delete(self, ids: Iterable[str], *, progress: Progress | None = None,
               total: int = 0) -> list[tuple[str, str, bool]]:
        return self._each(ids, self._delete_one, progress, total)

    def _delete_one(self, qid: str) -> str:
        for _ in range(5):
            state = self.locate(qid)
            try:
                self.spool.remove(state, qid)
            except FileNotFoundError:
                continue
            return f"deleted from {state.value}"
        raise QueueError(f"{qid}: kept moving; try again")

    def requeue(self, ids: Iterable[str], *, progress: Progress | None = None,
                total: int = 0, now: float | None = None) -> list[tuple[str, str, bool]]:
        """Back through delivery as if just received: attempts, errors and failed results
        are cleared and the lifetime starts again; recipients already sent stay sent."""
        return self._each(ids, lambda q: self._requeue_one(q, now), progress, total)

    def _requeue_one(self, qid: str, now: float | None) -> str:
        state = self.locate(qid)
        if state is State.ACTIVE:
            return "already active"
        if state not in (State.DEFERRED, State.HOLD, State.FAILED):
            raise QueueError(wrong_state(qid, "requeue", state,
                                         (State.DEFERRED, State.HOLD, State.FAILED)))
        if state is not State.HOLD:
            self._moving(qid, (state,), State.HOLD, "requeue")  # out of the pool's reach
        if legacy.is_legacy(self.spool.path(State.HOLD, qid)):
            legacy.convert(self.spool.dir(State.HOLD), qid, sync=self.spool.fsync)
        try:
            # the same lock as Spool.save: a late in-flight result is never overwritten
            with self.spool.locked(State.HOLD, qid) as fd:
                rec = self.read(State.HOLD, qid)
                if rec is None:
                    raise QueueError(f"{qid}: record unreadable; left in hold/")
                rec.results = {r: v for r, v in rec.results.items()
                               if v.get("status") != FAILED}
                rec.attempts, rec.last_error, rec.next_attempt = 0, "", 0.0
                rec.envelope = dataclasses.replace(
                    rec.envelope, received_at=time.time() if now is None else now)
                self.spool.replace(State.HOLD, fd, rec)
        except FileNotFoundError:
            raise QueueError(f"{qid}: moved while requeueing; try again") from None
        self._rename(qid, State.HOLD, State.ACTIVE)
        return f"{state.value} -> active (requeued)"

    def all_ids(self, state: State) -> list[str]:
        return sorted(self.spool.scan(state))


def dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=False, default=str)
