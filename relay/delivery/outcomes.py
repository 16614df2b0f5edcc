"""What an attempt leaves behind: the record in the spool, then the listeners told.

Every outcome is durable before anyone hears of it: the record replaced (save), the
message removed from active/ (discard), or moved to deferred/ with its next attempt as
the mtime (postpone), to hold/ (hold) or to failed/ (finish, then the on_failed hook,
e.g. a DSN). The flushes are shared through the group commit. A change the spool
refuses (disk full, read-only, I/O error) leaves the newer record with
relay.delivery.unsaved, which stops delivery until it is saved, and raises ResultNotSaved.
Reads and writes active/, deferred/, hold/ and failed/. Used by relay.delivery.attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from relay.delivery.ports import Listener
from relay.delivery.retry import RetryPolicy
from relay.delivery.unsaved import Unsaved
from relay.errors import SpoolError
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.record import FAILED, Record, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")


class ResultNotSaved(SpoolError):
    """A delivery result could not be written: the record is kept in memory (Unsaved), the
    message must not be tried again until it is saved."""


def failed(record: Record) -> list[str]:
    """The recipients whose result is a permanent failure."""
    return [r for r, res in record.results.items() if res.get("status") == FAILED]


class Outcomes:
    def __init__(self, *, spool: Spool, commit: GroupCommit, policy: RetryPolicy,
                 unsaved: Unsaved, listeners: Sequence[Listener] = (),
                 on_failed: Callable[[Record, str], Awaitable[None]] | None = None,
                 clock: Callable[[], float]) -> None:
        self.spool = spool
        self.commit = commit
        self.policy = policy
        self.unsaved = unsaved
        self.listeners = list(listeners)
        self.on_failed = on_failed
        self.clock = clock

    async def tell(self, kind: str, record: Record, recipients: Sequence[str], *,
                   ses_message_id: str = "", error: str = "") -> None:
        for listener in self.listeners:
            try:
                await listener.outcome(kind, record, recipients,
                                       ses_message_id=ses_message_id, error=error)
            except Exception:  # noqa: BLE001 - a listener must never stop delivery
                log.exception("listener %r failed on %s", listener, kind)

    async def _durably(self, record: Record, change: Callable[[], Path | None] | None
                       ) -> None:
        """Run a spool change in a thread, then wait for the shared flush (None: remove
        the finished message, the unlink made with the flush by the group commit's
        thread). FileNotFoundError (moved or deleted by an operator) passes; any other
        failure keeps the record in memory and raises ResultNotSaved."""
        since = self.spool.since()
        try:
            if change is None:
                await self.commit.bury(State.ACTIVE, record.id, since=since)
            else:
                grave = await asyncio.to_thread(change)
                await self.commit.barrier(grave, since=since)
        except FileNotFoundError:
            raise
        except (OSError, SpoolError) as exc:
            self.unsaved.keep(record, exc)
            raise ResultNotSaved(f"{record.id}: result not saved: {exc}") from exc

    async def save(self, record: Record) -> None:
        """Replace the record; durable on return (the flush is shared)."""
        def change() -> None:
            self.spool.save(State.ACTIVE, record, durable=False)
        await self._durably(record, change)

    async def discard(self, record: Record) -> None:
        """Remove a finished message from active/; durable on return (shared flush)."""
        await self._durably(record, None)

    async def finish(self, record: Record) -> None:
        """No recipient left: to failed/ if any failed (and on_failed told), else gone."""
        lost = failed(record)
        if not lost:
            await self.discard(record)
            return
        def change() -> None:
            self.spool.move(record.id, State.ACTIVE, State.FAILED, durable=False)
        await self._durably(record, change)
        event(log, "failed", level=logging.WARNING, queue_id=record.id,
              error=record.last_error, recipients=lost)
        await self.tell("failed", record, lost, error=record.last_error)
        if self.on_failed is not None:
            await self.on_failed(record, record.last_error)

    async def fail_pending(self, record: Record, reason: str) -> None:
        at = self.clock()
        for rcpt in record.pending():
            record.results[rcpt] = {"status": FAILED, "at": at, "reason": reason}
        record.last_error = reason
        await self.save(record)
        await self.finish(record)

    async def postpone(self, record: Record, error: str, *, count: bool,
                       wait: float | None = None) -> None:
        """To deferred/ until the next attempt: after `wait` seconds, else the retry
        policy's backoff (`count`: this was an attempt that counts toward it)."""
        await self._durably(record, lambda: self._defer(record, error, count, wait))
        await self.tell("deferred", record, record.pending(), error=error)

    def _defer(self, record: Record, error: str, count: bool, wait: float | None) -> None:
        """Save the error and move the message to deferred/ until its next attempt."""
        now = self.clock()
        if count:
            record.attempts += 1
        if wait is None:
            nxt = self.policy.next_attempt(record.attempts, record.envelope.received_at, now)
        else:
            nxt = now + wait
        if nxt is None:
            # outlived max_lifetime: the next attempt fails it as expired
            nxt = now
        record.last_error = error
        record.next_attempt = nxt
        self.spool.save(State.ACTIVE, record, durable=False)
        self.spool.move(record.id, State.ACTIVE, State.DEFERRED, when=nxt, durable=False)
        event(log, "deferred", queue_id=record.id, error=error, attempts=record.attempts,
              next_attempt=round(nxt, 3))

    async def hold(self, record: Record) -> None:
        """To hold/ with its last error, until an operator releases it."""
        await self._durably(record, lambda: self._hold(record))

    def _hold(self, record: Record) -> None:
        self.spool.save(State.ACTIVE, record, durable=False)
        self.spool.move(record.id, State.ACTIVE, State.HOLD, durable=False)
