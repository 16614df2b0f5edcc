"""One delivery attempt of one message: its pending recipients, in calls of at most 50.

Fails the message if it outlived its lifetime, drops suppressed recipients (checked now,
not at acceptance), then sends the rest in calls no larger than the limiter's per-call
capacity and the 24-hour quota left. Each call's outcome has its own handler: accepted
recipients are recorded durably before anything else (invariant 3); a refusal defers,
holds, fails or pauses according to the exception class the SES edge raised. A message
is never taken while its 250 is still unanswered or its newest result waits in memory; a
suppression list that cannot answer holds all delivery for a while, the message untouched.
Reads active/; the spool side is relay.delivery.outcomes. Run by the delivery pool's workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from relay.delivery.account import SES_PAUSE, Gate
from relay.delivery.outcomes import Outcomes, ResultNotSaved, failed
from relay.delivery.ports import Sender, Suppressions
from relay.delivery.ratelimit import Quota, RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.settings import PoolSettings
from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    QuotaExceededError,
    ThrottledError,
    TransientError,
)
from relay.log import event
from relay.spool.reading import CorruptMessage
from relay.spool.record import FAILED, SENT, SUPPRESSED, Record, State
from relay.spool.spool import Spool

log = logging.getLogger("relay.delivery")

#: SES accepts at most 50 destinations per SendEmail call.
MAX_DESTINATIONS = 50
#: messages up to this size are read for delivery on the loop, bigger ones in a thread
INLINE_READ = 256 * 1024
QUOTA_USED_UP = "24-hour sending quota used up"
#: the gate's hold while the suppression list cannot answer
DATABASE = "database"

#: What one refused call does to the message: (record, the call's recipients, every
#: recipient still pending from it on, the error) -> whether to go on with the rest.
Handler = Callable[[Record, list[str], list[str], DeliveryError], Awaitable[bool]]


class Attempt:
    def __init__(self, *, spool: Spool, sender: Sender, limiter: RateLimiter, quota: Quota,
                 policy: RetryPolicy, gate: Gate, pause: Callable[[str], None],
                 outcomes: Outcomes, settings: PoolSettings, on_retry: Callable[[], None],
                 suppressions: Suppressions | None = None,
                 clock: Callable[[], float]) -> None:
        self.spool = spool
        self.sender = sender
        self.limiter = limiter
        self.quota = quota
        self.policy = policy
        self.gate = gate
        #: pauses the whole pool (the account watch's pause)
        self.pause = pause
        #: called when a hold ends: mail left in active/ is read again
        self.on_retry = on_retry
        self.outcomes = outcomes
        self.settings = settings
        self.suppressions = suppressions
        self.clock = clock
        #: the suppression list failed and has not answered since (one log line per outage)
        self.database_down = False
        #: entries in active/ that are not messages and could not be moved to corrupt/
        self.corrupt: set[str] = set()
        #: time a worker holds one call's work (SES latency plus spool writes), smoothed;
        #: the pool sizes its concurrency on it (Little's law)
        self.latency = 0.05
        #: most specific class first: a QuotaExceededError is also a ThrottledError
        self.handlers: tuple[tuple[type[DeliveryError], Handler], ...] = (
            (QuotaExceededError, self._quota_exceeded),
            (ThrottledError, self._throttled),
            (TransientError, self._transient),
            (AccountPausedError, self._account_paused),
            (ConfigurationError, self._misconfigured),
            (PermanentError, self._rejected),
        )

    async def run(self, qid: str) -> None:
        """process(), with every failure kept to this one message."""
        if (qid in self.outcomes.commit.unacknowledged or self.outcomes.unsaved.holds(qid)
                or qid in self.corrupt):
            # its client has no 250 yet (a failing flush would answer 451 and take it back),
            # or its newest record is not on disk: the scheduler offers it again later
            return
        try:
            await self.process(qid)
        except ResultNotSaved:
            pass  # kept in memory, delivery held, both logged by relay.delivery.unsaved
        except CorruptMessage as exc:
            # moved to corrupt/; if even that failed, never looked at again by this process
            event(log, "corrupt", level=logging.ERROR, queue_id=qid, error=str(exc))
            if self.spool.exists(State.ACTIVE, qid):
                self.corrupt.add(qid)
        except FileNotFoundError:
            pass  # moved away by an operator (hold, delete) while waiting
        except Exception as exc:  # noqa: BLE001 - one message must not stop the pool
            log.exception("unexpected error delivering %s", qid)
            try:
                record = self.spool.load(State.ACTIVE, qid)
                await self.outcomes.postpone(record, f"internal error: {exc}", count=True)
            except Exception:  # noqa: BLE001
                pass

    async def process(self, qid: str) -> None:
        # a small message is read on the loop (one read of a cached file costs less than
        # the hop to a thread); a big one in a thread, so the loop is not held up
        got = self.spool.read_small(State.ACTIVE, qid, INLINE_READ)
        record, raw = got if got is not None else await asyncio.to_thread(self._read, qid)
        if self.policy.expired(record.envelope.received_at, self.clock()):
            reason = "expired: " + (record.last_error or "no attempt succeeded")
            await self.outcomes.fail_pending(record, reason)
            return
        pending = await self._drop_suppressed(record, record.pending())
        if pending is None:
            return  # the suppression list cannot answer: untouched, tried again later
        while pending:
            chunk = await self._next_call(record, pending)
            if chunk is None or not await self._call(record, raw, chunk, pending):
                return
            pending = pending[len(chunk):]
        await self.outcomes.finish(record)

    def _read(self, qid: str) -> tuple[Record, bytes]:
        return self.spool.read(State.ACTIVE, qid)

    async def _drop_suppressed(self, record: Record, pending: list[str]
                               ) -> list[str] | None:
        """Record suppressed recipients as such; the rest, still to send. None: the list
        could not be read, so nothing may be sent now."""
        if self.suppressions is None or not pending:
            return pending
        # checked now, not at acceptance: the list may have changed while mail waited
        try:
            dropped = await self.suppressions.suppressed(pending)
        except Exception as exc:  # noqa: BLE001 - any failure of the port: cannot check
            self._database_failed(exc)
            return None
        if self.database_down:
            self.database_down = False
            event(log, "suppression_check_recovered")
        if not dropped:
            return pending
        at = self.clock()
        for rcpt in dropped:
            record.results[rcpt] = {"status": SUPPRESSED, "at": at}
        await self.outcomes.save(record)
        event(log, "suppressed", queue_id=record.id, recipients=sorted(dropped))
        await self.outcomes.tell("suppressed", record, sorted(dropped))
        return [r for r in pending if r not in dropped]

    def _database_failed(self, exc: Exception) -> None:
        """The suppression list cannot answer: hold all delivery for pause_probe_interval
        (then the next message tries again); no attempt counted, one log line per outage."""
        first = (str(exc).splitlines() or [""])[0]
        reason = f"suppression list unreachable: {type(exc).__name__}: {first}"
        if not self.database_down:
            self.database_down = True
            event(log, "suppression_check_failed", level=logging.ERROR, error=reason,
                  hint="delivery waits until the database answers; nothing is sent meanwhile")
        if DATABASE not in self.gate.holds:
            self.gate.hold(DATABASE, reason)
            asyncio.get_running_loop().call_later(self.settings.pause_probe_interval,
                                                  self._database_retry)

    def _database_retry(self) -> None:
        self.gate.release(DATABASE)
        self.on_retry()

    async def _next_call(self, record: Record, pending: list[str]) -> list[str] | None:
        """The recipients of the next call, once the rate lets them go; None: stop here
        (paused or stopping meanwhile, moved by an operator, or the quota used up)."""
        await self.gate.wait_unpaused()
        if not self.spool.exists(State.ACTIVE, record.id):
            return None  # held or deleted by an operator meanwhile: send nothing more
        cap = min(MAX_DESTINATIONS, self.limiter.capacity(time.monotonic()))
        granted = self.quota.take(len(pending[:cap]))
        if granted == 0:
            # the 24-hour quota frees on a rolling basis: look again later
            await self.outcomes.postpone(record, QUOTA_USED_UP, count=False,
                                         wait=self.settings.account_refresh)
            return None
        chunk = pending[:cap][:granted]
        await self.limiter.acquire(len(chunk))
        if self.gate.closed:
            # paused (or stopping) while waiting for the rate: keep it queued, untouched
            self.quota.give_back(len(chunk))
            return None
        return chunk

    async def _call(self, record: Record, raw: bytes, chunk: list[str],
                    pending: list[str]) -> bool:
        """One SendEmail call and its outcome; whether to go on with the rest."""
        started = time.monotonic()
        try:
            message_id = await self.sender.send_raw(sender=record.envelope.sender,
                                                    recipients=chunk, raw=raw,
                                                    options=record.envelope.ses)
        except DeliveryError as exc:
            for cls, handler in self.handlers:
                if isinstance(exc, cls):
                    self.quota.give_back(len(chunk))
                    return await handler(record, chunk, pending, exc)
            raise
        self.quota.sent(len(chunk))
        self.latency = 0.9 * self.latency + 0.1 * (time.monotonic() - started)
        return await self._sent(record, chunk, pending, message_id)

    # -- one handler per outcome ----------------------------------------------------

    async def _sent(self, record: Record, chunk: list[str], pending: Sequence[str],
                    message_id: str) -> bool:
        at = self.clock()
        for rcpt in chunk:
            record.results[rcpt] = {"status": SENT, "at": at, "ses_message_id": message_id}
        done = len(chunk) == len(pending) and not failed(record)
        # durable before anything else: a retry or restart skips these recipients. When
        # this call finished the message, removing it from active/ is that record (its
        # record would be deleted right after being written).
        if done:
            try:
                await self.outcomes.discard(record)
            except FileNotFoundError:
                # held by an operator during the call: the result goes where it is
                await self.outcomes.save(record)
        else:
            await self.outcomes.save(record)
        # logged once recorded: a "sent" line is never followed by a second call
        event(log, "sent", queue_id=record.id, ses_message_id=message_id, recipients=chunk)
        await self.outcomes.tell("sent", record, chunk, ses_message_id=message_id)
        return not done

    async def _quota_exceeded(self, record: Record, chunk: list[str], pending: list[str],
                              exc: DeliveryError) -> bool:
        # not too fast but too much: wait for the rolling 24 hours to free some
        self.quota.exhaust()
        await self.outcomes.postpone(record, str(exc), count=False,
                                     wait=self.settings.account_refresh)
        return False

    async def _throttled(self, record: Record, chunk: list[str], pending: list[str],
                         exc: DeliveryError) -> bool:
        self.limiter.throttled(time.monotonic())
        event(log, "throttled", level=logging.WARNING, queue_id=record.id, error=str(exc))
        await self.outcomes.tell("throttled", record, chunk, error=str(exc))
        await self.outcomes.postpone(record, str(exc), count=False,
                                     wait=self.settings.throttle_retry)
        return False

    async def _transient(self, record: Record, chunk: list[str], pending: list[str],
                         exc: DeliveryError) -> bool:
        await self.outcomes.postpone(record, str(exc), count=True)
        return False

    async def _account_paused(self, record: Record, chunk: list[str], pending: list[str],
                              exc: DeliveryError) -> bool:
        # the message stays in active/; the pool sends nothing until GetAccount says so
        record.last_error = str(exc)
        await self.outcomes.save(record)
        self.pause(f"{SES_PAUSE} refused sending for the account: {exc}")
        return False

    async def _misconfigured(self, record: Record, chunk: list[str], pending: list[str],
                             exc: DeliveryError) -> bool:
        record.last_error = str(exc)
        await self.outcomes.hold(record)
        event(log, "held", level=logging.ERROR, queue_id=record.id, error=str(exc),
              hint="fix the SES configuration, then: relay queue release " + record.id)
        await self.outcomes.tell("held", record, pending, error=str(exc))
        return False

    async def _rejected(self, record: Record, chunk: list[str], pending: list[str],
                        exc: DeliveryError) -> bool:
        at = self.clock()
        for rcpt in chunk:
            record.results[rcpt] = {"status": FAILED, "at": at, "reason": str(exc)}
        record.last_error = str(exc)
        await self.outcomes.save(record)
        event(log, "rejected", level=logging.WARNING, queue_id=record.id, error=str(exc),
              recipients=chunk)
        await self.outcomes.tell("rejected", record, chunk, error=str(exc))
        return True
