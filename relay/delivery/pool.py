"""The delivery pool: takes ready messages from the spool and sends them through a Sender.

Reads active/ and deferred/ (due ones move back to active/), sends each message's pending
recipients in calls of at most 50 (and at most the limiter's per-call capacity), records
each call's accepted recipients and SES MessageId in envelope.json before anything else,
and moves the message to deferred/, hold/ or failed/, or deletes it when done. Imports no
transport: the Sender and AccountSource ports are implemented by relay.ses.client. Built by
relay.service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from relay.delivery.ports import Account, AccountSource, Listener, Sender, Suppressions
from relay.delivery.ratelimit import Quota, RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from relay.log import event
from relay.spool.commit import GroupCommit
from relay.spool.spool import FAILED, SENT, SUPPRESSED, CorruptMessage, Record, Spool, State

log = logging.getLogger("relay.delivery")

#: SES accepts at most 50 destinations per SendEmail call.
MAX_DESTINATIONS = 50
#: A pass over deferred/ stats every message there; reading it takes at most this share
#: of the time (with a million deferred, one pass reads for seconds).
DEFERRED_PASS_SHARE = 0.1
#: Due deferred messages moved back to active/ per fsync of active/.
ACTIVATE_BATCH = 256
#: A directory modified this recently may change again within the same timestamp tick,
#: leaving its mtime as it was: such an mtime is not trusted to mean "unchanged".
MTIME_SETTLE = 1.0


class DeliveryPool:
    def __init__(
        self,
        *,
        spool: Spool,
        sender: Sender,
        accounts: AccountSource,
        limiter: RateLimiter,
        policy: RetryPolicy,
        max_rate: float = 0.0,
        max_concurrency: int = 50,
        ready_queue: int = 1000,
        scan_interval: float = 1.0,
        throttle_retry: float = 1.0,
        account_refresh: float = 300.0,
        pause_probe_interval: float = 30.0,
        on_failed: Callable[[Record, str], Awaitable[None]] | None = None,
        suppressions: Suppressions | None = None,
        listeners: Sequence[Listener] = (),
        clock: Callable[[], float] = time.time,
        commit: GroupCommit | None = None,
        owns: Callable[[str], bool] | None = None,
        share: float = 1.0,
    ) -> None:
        self.spool = spool
        #: one worker of several (relay.ops.workers) delivers only its partition of the spool,
        #: at its share of the account's rate and quota
        self.owns = owns or (lambda qid: True)
        self.share = share
        #: spool flushes shared with concurrent calls (and the ingress, when given its)
        self.commit = commit or GroupCommit(spool)
        self.sender = sender
        self.accounts = accounts
        self.limiter = limiter
        self.quota = Quota()
        self.policy = policy
        self.max_rate = max_rate
        self.max_concurrency = max_concurrency
        self.scan_interval = scan_interval
        self.throttle_retry = throttle_retry
        self.account_refresh = account_refresh
        self.pause_probe_interval = pause_probe_interval
        self.on_failed = on_failed
        self.suppressions = suppressions
        self.listeners = list(listeners)
        self.clock = clock
        self.account: Account | None = None
        self.paused_reason = ""
        self._ready: asyncio.Queue[str] = asyncio.Queue(maxsize=ready_queue)
        self._claimed: set[str] = set()
        self._rescan = asyncio.Event()
        #: the ready queue was found full: refill once workers have drained half of it
        self._want_room = False
        #: the earliest next attempt the last pass over deferred/ left there (0: unknown)
        self._next_due = 0.0
        #: deferred/'s mtime when that pass began, if settled (see MTIME_SETTLE)
        self._deferred_seen: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._account_changed = asyncio.Event()
        #: time a worker holds one call's work (SES latency plus spool writes), smoothed;
        #: sizes concurrency by Little's law
        self.latency = 0.05
        self._busy = 0
        self._slot_freed = asyncio.Condition()

    # -- control --------------------------------------------------------------------

    def notify(self, qid: str) -> None:
        """A message was just queued in active/ (called by ingress)."""
        if self._stopping or qid in self._claimed:
            return
        try:
            self._ready.put_nowait(qid)
            self._claimed.add(qid)
        except asyncio.QueueFull:
            self._rescan.set()

    @property
    def paused(self) -> bool:
        return bool(self.paused_reason)

    def pause(self, reason: str) -> None:
        if not self.paused_reason:
            event(log, "paused", level=logging.ERROR, reason=reason)
        self.paused_reason = reason
        self._unpaused.clear()
        self._account_changed.set()

    def resume(self) -> None:
        if self.paused_reason:
            event(log, "resumed", previous_reason=self.paused_reason)
        self.paused_reason = ""
        self._unpaused.set()
        self._rescan.set()

    async def start(self) -> None:
        await self.refresh_account()
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._scanner(), name="scanner"),
            asyncio.create_task(self._promoter(), name="promoter"),
            asyncio.create_task(self._account_monitor(), name="account"),
            *(
                asyncio.create_task(self._worker(), name=f"worker-{i}")
                for i in range(self.max_concurrency)
            ),
        ]

    async def stop(self, timeout: float) -> None:
        """Stop taking messages; let in-flight ones finish within `timeout` seconds."""
        self._stopping = True
        for task in self._tasks:
            if task.get_name() in ("scanner", "promoter", "account"):
                task.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inflight:
            event(log, "shutdown_abandoned", level=logging.WARNING, inflight=len(self._inflight))

    # -- account --------------------------------------------------------------------

    async def refresh_account(self) -> None:
        try:
            account = await self.accounts.get_account()
        except DeliveryError as exc:
            if self.account is None:
                fallback = (self.max_rate or 1.0) * self.share
                self.limiter.set_rate(fallback)
                event(log, "account_unknown", level=logging.WARNING, error=str(exc), rate=fallback)
            return
        if account != self.account:
            event(log, "account", max_send_rate=account.max_send_rate,
                  max_24hour_send=account.max_24hour_send,
                  sent_last_24hours=account.sent_last_24hours,
                  sending_enabled=account.sending_enabled,
                  enforcement_status=account.enforcement_status)
        self.account = account
        rate = account.max_send_rate
        if self.max_rate:
            rate = min(rate, self.max_rate)
        self.limiter.set_rate(max(rate * self.share, 0.01))
        self.quota.update(account.max_24hour_send * self.share,
                          account.sent_last_24hours * self.share)
        if not account.sending_enabled:
            self.pause("SES sending is disabled for the account (GetAccount SendingEnabled=false)")
        elif self.paused_reason.startswith("SES"):
            self.resume()

    async def _account_monitor(self) -> None:
        """Re-read the account every account_refresh; while paused, probe more often."""
        while True:
            if self.paused or self.account is None:
                await asyncio.sleep(self.pause_probe_interval)
            else:
                try:
                    await asyncio.wait_for(self._account_changed.wait(), self.account_refresh)
                except TimeoutError:
                    pass
                self._account_changed.clear()
                if self.paused:
                    continue  # just paused: wait one probe interval before asking
            await self.refresh_account()

    # -- scheduling -----------------------------------------------------------------

    async def _scanner(self) -> None:
        """Keep the ready queue filled from active/. Woken by ingress, by the promoter,
        by a worker that drained a full queue to half, and every scan_interval (work
        placed by the queue CLI)."""
        self._rescan.set()
        while True:
            self._rescan.clear()
            if not self.paused:
                try:
                    await self._fill()
                except OSError as exc:
                    event(log, "scan_error", level=logging.ERROR, error=str(exc))
            try:
                await asyncio.wait_for(self._rescan.wait(), timeout=self.scan_interval)
            except TimeoutError:
                pass

    async def _fill(self) -> None:
        room = self._ready.maxsize - self._ready.qsize()
        if room > 0:
            for qid in await asyncio.to_thread(self._unclaimed, room):
                if self._ready.full():
                    break
                if qid not in self._claimed:
                    self._claimed.add(qid)
                    self._ready.put_nowait(qid)
        if self._ready.full():
            # more may wait in active/: read it again once there is room, not in a loop
            self._want_room = True

    def _unclaimed(self, room: int) -> list[str]:
        """Up to `room` queue ids in active/ that no worker holds or waits for."""
        out: list[str] = []
        for qid in self.spool.scan(State.ACTIVE):
            if qid not in self._claimed and self.owns(qid):
                out.append(qid)
                if len(out) >= room:
                    break
        return out

    async def _promoter(self) -> None:
        """Move due deferred mail to active/. A pass stats every message in deferred/, so
        it runs only when something there can be due (the earliest next attempt the last
        pass saw has come, or deferred/ changed since), and reading deferred/ takes at
        most DEFERRED_PASS_SHARE of the time (moving due mail is work, not counted)."""
        while True:
            rest = self.scan_interval
            try:
                if self._deferred_may_be_due():
                    started = time.monotonic()
                    moved, moving = await asyncio.to_thread(self._promote_due)
                    took = time.monotonic() - started
                    rest = max(rest, (took - moving) * (1 / DEFERRED_PASS_SHARE - 1))
                    if moved:
                        event(log, "deferred_due", moved=moved, seconds=round(took, 3))
            except OSError as exc:
                event(log, "scan_error", level=logging.ERROR, error=str(exc))
            await asyncio.sleep(rest)

    def _deferred_may_be_due(self) -> bool:
        if self.clock() >= self._next_due:
            return True
        return os.stat(self.spool.dir(State.DEFERRED)).st_mtime_ns != self._deferred_seen

    def _promote_due(self) -> tuple[int, float]:
        """One pass over deferred/: due messages to active/ (the scanner is told after
        each batch); notes the earliest next attempt left. Returns the count moved and
        the seconds spent moving them."""
        seen = os.stat(self.spool.dir(State.DEFERRED))
        settled = time.time() - seen.st_mtime > MTIME_SETTLE
        now = self.clock()
        later = math.inf
        batch: list[str] = []
        moved, moving = 0, 0.0
        for qid, at in self.spool.next_attempts(State.DEFERRED):
            if self._stopping:
                return moved, moving
            if not self.owns(qid):
                continue  # another worker's partition (relay.ops.workers)
            if at > now:
                later = min(later, at)
                continue
            batch.append(qid)
            if len(batch) >= ACTIVATE_BATCH:
                n, took = self._activate(batch)
                moved, moving, batch = moved + n, moving + took, []
        n, took = self._activate(batch)
        self._next_due = later
        self._deferred_seen = seen.st_mtime_ns if settled else None
        return moved + n, moving + took

    def _activate(self, qids: list[str]) -> tuple[int, float]:
        """Move a batch to active/ and tell the scanner; the count moved, and how long."""
        started = time.monotonic()
        moved = len(self.spool.activate(qids)) if qids else 0
        if moved and self._loop is not None:
            self._loop.call_soon_threadsafe(self._rescan.set)
        return moved, time.monotonic() - started

    @property
    def target_concurrency(self) -> int:
        """Little's law: calls in flight = rate x latency, with headroom, capped by config."""
        rate = self.limiter.rate(time.monotonic())
        need = math.ceil(rate * self.latency * 1.5) + 2
        return max(1, min(self.max_concurrency, need))

    async def _worker(self) -> None:
        while True:
            await self._unpaused.wait()
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._busy < self.target_concurrency)
                self._busy += 1
            try:
                await self._take_one()
            finally:
                async with self._slot_freed:
                    self._busy -= 1
                    # one slot freed: wake one waiter, not every idle worker
                    self._slot_freed.notify(1)

    async def _take_one(self) -> None:
        while True:
            qid = await self._ready.get()
            self._taken()
            if self.paused or self._stopping:
                self._claimed.discard(qid)
                continue
            task = asyncio.create_task(self._process_guarded(qid))
            self._inflight.add(task)
            try:
                await asyncio.shield(task)
            finally:
                self._inflight.discard(task)
                self._claimed.discard(qid)
            return

    def _taken(self) -> None:
        """A message left the ready queue: once a queue found full is down to half, the
        scanner reads active/ again."""
        if self._want_room and self._ready.qsize() <= self._ready.maxsize // 2:
            self._want_room = False
            self._rescan.set()

    async def _process_guarded(self, qid: str) -> None:
        try:
            await self.process(qid)
        except CorruptMessage as exc:
            event(log, "corrupt", level=logging.ERROR, queue_id=qid, error=str(exc))
        except FileNotFoundError:
            pass  # moved away by an operator (hold, delete) while waiting
        except Exception as exc:  # noqa: BLE001 - one message must not stop the pool
            log.exception("unexpected error delivering %s", qid)
            try:
                record = self.spool.load(State.ACTIVE, qid)
                await self._postpone(record, f"internal error: {exc}", True)
            except Exception:  # noqa: BLE001
                pass

    # -- one message ----------------------------------------------------------------

    async def _tell(self, kind: str, record: Record, recipients: Sequence[str], *,
                    ses_message_id: str = "", error: str = "") -> None:
        for listener in self.listeners:
            try:
                await listener.outcome(kind, record, recipients,
                                       ses_message_id=ses_message_id, error=error)
            except Exception:  # noqa: BLE001 - a listener must never stop delivery
                log.exception("listener %r failed on %s", listener, kind)

    async def process(self, qid: str) -> None:
        spool = self.spool
        record, raw = await asyncio.to_thread(self._read, qid)
        now = self.clock()
        if self.policy.expired(record.envelope.received_at, now):
            await self._fail_pending(record, "expired: " + (record.last_error or "no attempt succeeded"))
            return
        pending = record.pending()
        if self.suppressions is not None and pending:
            # checked now, not at acceptance: the list may have changed while mail waited
            dropped = await self.suppressions.suppressed(pending)
            if dropped:
                at = self.clock()
                for rcpt in dropped:
                    record.results[rcpt] = {"status": SUPPRESSED, "at": at}
                await self._save(record)
                event(log, "suppressed", queue_id=qid, recipients=sorted(dropped))
                await self._tell("suppressed", record, sorted(dropped))
                pending = [r for r in pending if r not in dropped]
        while pending:
            await self._unpaused.wait()
            if not spool.path(State.ACTIVE, qid).is_dir():
                return  # held or deleted by an operator meanwhile: send nothing more
            cap = min(MAX_DESTINATIONS, self.limiter.capacity(time.monotonic()))
            chunk = pending[:cap]
            granted = self.quota.take(len(chunk))
            if granted == 0:
                # the 24-hour quota frees on a rolling basis: look again later
                await self._postpone(record, "24-hour sending quota used up", False,
                                     self.account_refresh)
                return
            chunk = chunk[:granted]
            await self.limiter.acquire(len(chunk))
            if self.paused or self._stopping:
                # paused (or stopping) while waiting for the rate: keep it queued, untouched
                self.quota.give_back(len(chunk))
                return
            started = time.monotonic()
            try:
                message_id = await self.sender.send_raw(
                    sender=record.envelope.sender, recipients=chunk, raw=raw
                )
            except ThrottledError as exc:
                self.quota.give_back(len(chunk))
                if "daily" in exc.message.lower() and "quota" in exc.message.lower():
                    # not too fast but too much: wait for the rolling 24 hours to free some
                    self.quota.exhaust()
                    await self._postpone(record, str(exc), False, self.account_refresh)
                    return
                self.limiter.throttled(time.monotonic())
                event(log, "throttled", level=logging.WARNING, queue_id=qid, error=str(exc))
                await self._tell("throttled", record, chunk, error=str(exc))
                await self._postpone(record, str(exc), False, self.throttle_retry)
                return
            except TransientError as exc:
                self.quota.give_back(len(chunk))
                await self._postpone(record, str(exc), True)
                return
            except AccountPausedError as exc:
                self.quota.give_back(len(chunk))
                record.last_error = str(exc)
                await self._save(record)
                self.pause(f"SES refused sending for the account: {exc}")
                return
            except ConfigurationError as exc:
                self.quota.give_back(len(chunk))
                record.last_error = str(exc)
                await asyncio.to_thread(self._hold, record)
                await self.commit.barrier()
                event(log, "held", level=logging.ERROR, queue_id=qid, error=str(exc),
                      hint="fix the SES configuration, then: relay queue release " + qid)
                await self._tell("held", record, pending, error=str(exc))
                return
            except PermanentError as exc:
                self.quota.give_back(len(chunk))
                at = self.clock()
                for rcpt in chunk:
                    record.results[rcpt] = {"status": FAILED, "at": at, "reason": str(exc)}
                record.last_error = str(exc)
                await self._save(record)
                event(log, "rejected", level=logging.WARNING, queue_id=qid, error=str(exc),
                      recipients=chunk)
                await self._tell("rejected", record, chunk, error=str(exc))
            else:
                at = self.clock()
                for rcpt in chunk:
                    record.results[rcpt] = {"status": SENT, "at": at, "ses_message_id": message_id}
                self.latency = 0.9 * self.latency + 0.1 * (time.monotonic() - started)
                done = len(chunk) == len(pending) and not self._failed(record)
                # durable before anything else: a retry or restart skips these recipients.
                # When this call finished the message, removing it from active/ is that
                # record (its envelope.json would be deleted right after being written).
                if done:
                    try:
                        await self._discard(record)
                    except FileNotFoundError:
                        # held by an operator during the call: the result goes where it is
                        await self._save(record)
                else:
                    await self._save(record)
                # logged once recorded: a "sent" line is never followed by a second call
                event(log, "sent", queue_id=qid, ses_message_id=message_id, recipients=chunk)
                await self._tell("sent", record, chunk, ses_message_id=message_id)
                if done:
                    return
            pending = pending[len(chunk):]
        await self._finish(record)

    def _read(self, qid: str) -> tuple[Record, bytes]:
        return (self.spool.load(State.ACTIVE, qid),
                self.spool.read_message(State.ACTIVE, qid))

    @staticmethod
    def _failed(record: Record) -> list[str]:
        return [r for r, res in record.results.items() if res.get("status") == FAILED]

    async def _save(self, record: Record) -> None:
        """Replace envelope.json; durable on return (the flush is shared)."""
        await asyncio.to_thread(self.spool.save, State.ACTIVE, record, durable=False)
        await self.commit.barrier()

    async def _discard(self, record: Record) -> None:
        """Remove a finished message from active/; durable on return (shared flush)."""
        grave = await asyncio.to_thread(self.spool.bury, State.ACTIVE, record.id)
        await self.commit.barrier(grave)

    async def _finish(self, record: Record) -> None:
        failed = self._failed(record)
        if failed:
            await asyncio.to_thread(self.spool.move, record.id, State.ACTIVE, State.FAILED,
                                    durable=False)
            await self.commit.barrier()
            event(log, "failed", level=logging.WARNING, queue_id=record.id,
                  error=record.last_error, recipients=failed)
            await self._tell("failed", record, failed, error=record.last_error)
            if self.on_failed is not None:
                await self.on_failed(record, record.last_error)
        else:
            await self._discard(record)

    async def _fail_pending(self, record: Record, reason: str) -> None:
        at = self.clock()
        for rcpt in record.pending():
            record.results[rcpt] = {"status": FAILED, "at": at, "reason": reason}
        record.last_error = reason
        await self._save(record)
        await self._finish(record)

    async def _postpone(self, record: Record, error: str, count: bool,
                        wait: float | None = None) -> None:
        await asyncio.to_thread(self._defer, record, error, count, wait)
        await self.commit.barrier()
        await self._tell("deferred", record, record.pending(), error=error)

    def _defer(self, record: Record, error: str, count: bool, wait: float | None = None) -> None:
        """Save the error and move the message to deferred/ until its next attempt."""
        now = self.clock()
        if count:
            record.attempts += 1
        if wait is None:
            nxt = self.policy.next_attempt(record.attempts, record.envelope.received_at, now)
        else:
            nxt = now + wait
        if nxt is None:
            # outlived max_lifetime: the next pass through process() fails it as expired
            nxt = now
        record.last_error = error
        record.next_attempt = nxt
        self.spool.save(State.ACTIVE, record, durable=False)
        self.spool.move(record.id, State.ACTIVE, State.DEFERRED, when=nxt, durable=False)
        event(log, "deferred", queue_id=record.id, error=error, attempts=record.attempts,
              next_attempt=round(nxt, 3))

    def _hold(self, record: Record) -> None:
        self.spool.save(State.ACTIVE, record, durable=False)
        self.spool.move(record.id, State.ACTIVE, State.HOLD, durable=False)


__all__ = ["Account", "AccountSource", "DeliveryPool", "Listener", "MAX_DESTINATIONS", "Sender",
           "Suppressions"]
