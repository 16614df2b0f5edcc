"""Delivery results the spool could not record, kept in memory until it can.

When saving what SES accepted fails (disk full, read-only spool, I/O error), the message
must not be tried again from its older record: that would send the accepted
recipients twice. Unsaved keeps the newer record, holds the whole pool (the spool could not
record the next result either), and tries to save every kept record each `retry` seconds;
once all are written and flushed it lifts the hold and wakes the scheduler. Writes
the record wherever the message is. Built by the delivery pool; the attempt asks it
before taking a message, /readyz shows its reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.delivery.account import Gate
from relay.errors import SpoolError
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.record import SENT, Record, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")

#: the gate's hold while results wait in memory
HOLD = "spool"


def sent_count(record: Record) -> int:
    return sum(1 for res in record.results.values() if res.get("status") == SENT)


class Unsaved:
    def __init__(self, *, spool: Spool, commit: GroupCommit, gate: Gate,
                 on_saved: Callable[[], None], retry: float) -> None:
        self.spool = spool
        self.commit = commit
        self.gate = gate
        #: called once every kept record is saved: mail left in active/ is read again
        self.on_saved = on_saved
        self.retry = retry
        #: queue id -> the newest record of a message, not yet on disk
        self.records: dict[str, Record] = {}
        self.error = ""
        #: tries to save since the first record was kept
        self.tries = 0
        self._kept = asyncio.Event()

    def holds(self, qid: str) -> bool:
        """Whether a message's newest record is only here: never deliver it meanwhile."""
        return qid in self.records

    @property
    def reason(self) -> str:
        """/readyz's reason while results wait in memory; "" when none do."""
        if not self.records:
            return ""
        return (f"spool {self.spool.root}: cannot record delivery results "
                f"({len(self.records)} messages kept in memory, delivery stopped, "
                f"{self.tries} tries to save): {self.error}")

    def keep(self, record: Record, exc: BaseException) -> None:
        """A result could not be saved: keep it, and stop all delivery until it is."""
        if not self.records:
            event(log, "spool_unwritable", level=logging.ERROR, error=str(exc),
                  hint="free space on the spool's filesystem or make it writable; "
                       "delivery resumes by itself")
        self.records[record.id] = record
        self.error = str(exc)
        event(log, "result_kept", level=logging.WARNING, queue_id=record.id,
              sent=sent_count(record), pending=len(record.pending()), error=str(exc))
        self.gate.hold(HOLD, self.reason)
        self._kept.set()

    async def run(self) -> None:
        """While anything is kept: try to save it all every `retry` seconds."""
        while True:
            await self._kept.wait()
            await asyncio.sleep(self.retry)
            await self.save_all()

    async def save_all(self) -> bool:
        """One try to save every kept record durably; True when none is left."""
        if not self.records:
            return True
        self.tries += 1
        batch = dict(self.records)
        since = self.spool.since()
        try:
            await asyncio.to_thread(self._write, list(batch.values()))
            await self.commit.barrier(since=since)
        except (OSError, SpoolError) as exc:
            self.error = str(exc)
            self.gate.hold(HOLD, self.reason)
            return False
        for qid, record in batch.items():
            if self.records.get(qid) is record:  # not kept again meanwhile
                del self.records[qid]
        if self.records:
            return False
        event(log, "spool_writable_again", saved=len(batch), tries=self.tries)
        self.tries, self.error = 0, ""
        self._kept.clear()
        self.gate.release(HOLD)
        self.on_saved()
        return True

    def _write(self, records: list[Record]) -> None:
        for record in records:
            try:
                # found wherever it is now (an operator may have held it meanwhile)
                self.spool.save(State.ACTIVE, record, durable=False)
            except FileNotFoundError:
                pass  # deleted by an operator: nothing left to record

    def lost(self) -> None:
        """At exit with results still unsaved: say which, so an operator can act."""
        for qid, record in self.records.items():
            event(log, "result_lost", level=logging.ERROR, queue_id=qid,
                  sent=sent_count(record), error=self.error,
                  recipients=[r for r, res in record.results.items()
                              if res.get("status") == SENT],
                  hint=f"these recipients were sent; before a restart, run: "
                       f"relay queue delete {qid} (or accept that they are sent again)")
