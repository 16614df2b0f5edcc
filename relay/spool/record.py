"""What a spooled message is: its state, envelope, delivery record and queue id.

A Record is the first line of a message's spool file (envelope, attempts, next attempt,
per-recipient results, last error: one line of JSON, the raw MIME after it); State names
the spool directories a message moves between; queue ids are sortable by arrival and
unique across processes, each in one worker's partition. Pure values: no file is read or
written here. Used by relay.spool.spool, the queue commands, delivery, the message log and
the wiring.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    INCOMING = "incoming"  #: being written; anything here at start-up is garbage
    ACTIVE = "active"  #: ready for delivery or in flight
    DEFERRED = "deferred"  #: waiting for the next attempt (the file's mtime)
    HOLD = "hold"  #: held by an operator or a configuration error
    FAILED = "failed"  #: permanent failure or expired; kept for inspection
    CORRUPT = "corrupt"  #: unreadable; kept, never deleted

    def __str__(self) -> str:
        return self.value


#: Final per-recipient outcomes; a recipient with none of these is still pending.
SENT, FAILED, SUPPRESSED = "sent", "failed", "suppressed"

#: The lane of mail no rule placed elsewhere, and of envelopes written before lanes.
DEFAULT_LANE = "transactional"


@dataclass(frozen=True)
class SesOptions:
    """Per-message SendEmail parameters (from X-SES-* headers and the lane's defaults)."""

    configuration_set: str = ""
    #: (name, value) message tags, in header order
    tags: tuple[tuple[str, str], ...] = ()
    tenant: str = ""
    #: ListManagementOptions: the contact list and (optional) topic
    contact_list: str = ""
    topic: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key in ("configuration_set", "tenant", "contact_list", "topic"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.tags:
            doc["tags"] = [list(t) for t in self.tags]
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> SesOptions:
        return cls(configuration_set=str(doc.get("configuration_set", "")),
                   tags=tuple((str(n), str(v)) for n, v in doc.get("tags", ())),
                   tenant=str(doc.get("tenant", "")),
                   contact_list=str(doc.get("contact_list", "")),
                   topic=str(doc.get("topic", "")))


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    client: str = ""
    helo: str = ""
    #: the lane decided at ingest (relay.ingress.lanes); older envelopes read as the default
    lane: str = DEFAULT_LANE
    ses: SesOptions = SesOptions()


@dataclass
class Record:
    """A message's envelope and delivery state, as kept in its spool file's first line."""

    id: str
    envelope: Envelope
    size: int
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    #: recipient -> {"status": sent|failed|suppressed, "at": time, "ses_message_id"|"reason"}
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def pending(self) -> list[str]:
        """Recipients with no final result yet, in envelope order, each once."""
        seen: set[str] = set()
        out = []
        for rcpt in self.envelope.recipients:
            if rcpt not in self.results and rcpt not in seen:
                seen.add(rcpt)
                out.append(rcpt)
        return out

    def to_json(self) -> bytes:
        """The record as indented JSON (the layout before one-file messages, and `show`)."""
        return json.dumps(self.to_doc(), indent=1).encode()

    def to_head(self) -> bytes:
        """The record as the first line of its spool file: one line of JSON and a newline
        (json.dumps escapes every newline inside a string, so the line cannot break)."""
        return json.dumps(self.to_doc()).encode() + b"\n"

    @classmethod
    def from_head(cls, raw: bytes) -> tuple[Record, int]:
        """The record on the first line of a spool file's bytes, and where the MIME starts.
        ValueError when there is no complete first line or it is no record."""
        end = raw.find(b"\n")
        if end < 0:
            raise ValueError("no record line")
        return cls.from_json(raw[:end]), end + 1

    def to_doc(self) -> dict[str, Any]:
        env = self.envelope
        doc: dict[str, Any] = {
            "id": self.id,
            "sender": env.sender,
            "recipients": list(env.recipients),
            "received_at": env.received_at,
            "client": env.client,
            "helo": env.helo,
            "lane": env.lane,
            "ses": env.ses.to_doc(),
            "size": self.size,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "results": self.results,
        }
        return doc

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        env = Envelope(
            sender=doc["sender"],
            recipients=tuple(doc["recipients"]),
            received_at=float(doc["received_at"]),
            client=doc.get("client", ""),
            helo=doc.get("helo", ""),
            lane=str(doc.get("lane") or DEFAULT_LANE),
            ses=SesOptions.from_doc(doc.get("ses") or {}),
        )
        return cls(
            id=doc["id"],
            envelope=env,
            size=int(doc["size"]),
            attempts=int(doc.get("attempts", 0)),
            next_attempt=float(doc.get("next_attempt", 0.0)),
            last_error=doc.get("last_error", ""),
            results=dict(doc.get("results", {})),
        )


# -- queue ids ----------------------------------------------------------------------

_id_lock = threading.Lock()
_id_last = 0
#: (index, count) of this worker process among `relay serve`'s workers (relay.ops.workers)
_worker = (0, 1)


def set_worker(index: int, count: int) -> None:
    """Make this process's queue ids fall in partition `index` of `count` (see partition)."""
    global _worker
    if not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    _worker = (index, count)


def partition(qid: str, count: int) -> int:
    """Which of `count` worker processes delivers a message: its id's last 5 hex digits
    mod count.

    Every id maps to exactly one worker; a worker's own ids map to itself, so it delivers
    what it accepted without asking anyone. Ids from elsewhere (sendmail, DSNs) land on
    whichever worker the formula names.
    """
    if count <= 1:
        return 0
    try:
        return int(qid[-5:], 16) % count
    except ValueError:
        return sum(qid.encode()) % count


def new_queue_id() -> str:
    """A queue id sortable by arrival time and unique across processes.

    13 hex digits of microseconds since the epoch, then 5 of the process id. Within one
    process the microsecond part is made strictly increasing, so two ids never collide.
    A worker of several (set_worker) rounds the process id part to its own partition:
    still distinct between the workers; a clash with another process would need the same
    microsecond and is refused by the exclusive create, never merged.
    """
    global _id_last
    with _id_lock:
        now = max(time.time_ns() // 1000, _id_last + 1)
        _id_last = now
    tag = os.getpid() & 0xFFFFF
    index, count = _worker
    if count > 1:
        tag = tag - tag % count + index
        if tag > 0xFFFFF:
            tag -= count
    return f"{now:013X}{tag:05X}"
