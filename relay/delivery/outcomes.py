"""What an attempt leaves behind: the record in the spool, then the listeners told.

Every outcome is durable before anyone hears of it: envelope.json replaced (save), the
message removed from active/ (discard), or moved to deferred/ with its next attempt as
the mtime (postpone), to hold/ (hold) or to failed/ (finish, then the on_failed hook,
e.g. a DSN). The flushes are shared through the group commit. Reads and writes active/,
deferred/, hold/ and failed/. Used by relay.delivery.attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from relay.delivery.ports import Listener
from relay.delivery.retry import RetryPolicy
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.record import FAILED, Record, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")


def failed(record: Record) -> list[str]:
    """The recipients whose result is a permanent failure."""
    return [r for r, res in record.results.items() if res.get("status") == FAILED]


class Outcomes:
    def __init__(self, *, spool: Spool, commit: GroupCommit, policy: RetryPolicy,
                 listeners: Sequence[Listener] = (),
                 on_failed: Callable[[Record, str], Awaitable[None]] | None = None,
                 clock: Callable[[], float]) -> None:
        self.spool = spool
        self.commit = commit
        self.policy = policy
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

    async def save(self, record: Record) -> None:
        """Replace envelope.json; durable on return (the flush is shared)."""
        await asyncio.to_thread(self.spool.save, State.ACTIVE, record, durable=False)
        await self.commit.barrier()

    async def discard(self, record: Record) -> None:
        """Remove a finished message from active/; durable on return (shared flush)."""
        grave = await asyncio.to_thread(self.spool.bury, State.ACTIVE, record.id)
        await self.commit.barrier(grave)

    async def finish(self, record: Record) -> None:
        """No recipient left: to failed/ if any failed (and on_failed told), else gone."""
        lost = failed(record)
        if not lost:
            await self.discard(record)
            return
        await asyncio.to_thread(self.spool.move, record.id, State.ACTIVE, State.FAILED,
                                durable=False)
        await self.commit.barrier()
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
        await asyncio.to_thread(self._defer, record, error, count, wait)
        await self.commit.barrier()
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
        await asyncio.to_thread(self._hold, record)
        await self.commit.barrier()

    def _hold(self, record: Record) -> None:
        self.spool.save(State.ACTIVE, record, durable=False)
        self.spool.move(record.id, State.ACTIVE, State.HOLD, durable=False)
