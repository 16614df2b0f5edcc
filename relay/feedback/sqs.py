"""The feedback ingester: long-polls the SQS queue that SES's SNS topic feeds.

feedback.receivers loops each ReceiveMessage (feedback.wait_time, up to 10 messages) with
aioboto3, parse and check their messages (an SNS envelope's signature and topic by the
same relay.feedback.sns.Verifier as the HTTPS endpoint; raw SES JSON only with
feedback.raw_delivery), and hand them to one apply loop, which applies everything
received meanwhile in ONE transaction through relay.feedback.applier, then deletes the
batch with DeleteMessageBatch only after that commit, then calls on_batch (the guard's
kick). A batch the database refuses for its data (not for a lock or a lost connection)
is applied again in halves, down to one notification per transaction, so only the
notification that fails on its own stays in SQS for the redrive. A message that cannot be
parsed or fails its check is logged, counted and left alone, so the queue's redrive
policy moves it to a dead-letter queue; one whose SES event is older than
feedback.max_event_age is deleted unapplied and counted. Writes no table itself. Built by
relay.feedback.thread, on its own thread (also against the sandbox's SQS
endpoint), and by tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import aiohttp
import botocore.exceptions
import sqlalchemy.exc
from aiobotocore.config import AioConfig

from relay.feedback.applier import AppliedBatch, FeedbackApplier
from relay.feedback.parse import Event, Notification, Unparseable, event_time, events, parse
from relay.feedback.sns import Rejected, Verifier
from relay.log import event

log = logging.getLogger("relay.ingester")

#: the outcomes of a message taken from SQS (relay.ops.metrics_scrape exposes each)
OUTCOMES = ("applied", "duplicate", "ignored", "unparseable", "rejected", "too_old", "errors")
#: events whose lag the p50/p99 gauges are computed over (the latest ones)
LAG_SAMPLE = 2048
#: receives per receiver whose messages may wait for their commit at once
INFLIGHT = 8
#: seconds between GetQueueAttributes calls for the backlog gauge
BACKLOG_INTERVAL = 5.0
#: PostgreSQL SQLSTATEs of a failure that a smaller batch would meet again (lock not
#: available, deadlock, serialization failure, statement timeout): not worth splitting for
TRANSIENT_SQLSTATES = frozenset({"55P03", "40P01", "40001", "57014"})
#: a notification with the receipt handle of the SQS message it came in
_Item = tuple[tuple[Notification, list[Event]], str]
#: a notification left in SQS, with what its transaction raised
_Failed = tuple[tuple[Notification, list[Event]], Exception]


def transient(exc: BaseException) -> bool:
    """Whether a failed transaction failed for the database's state (locked, unreachable),
    not for what it held: then the whole batch waits for the next try."""
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        OSError, TimeoutError)):
        return True
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in TRANSIENT_SQLSTATES


def queue_region(queue_url: str, default: str) -> str:
    """The region in an AWS queue URL (https://sqs.<region>.amazonaws.com/...), else default."""
    m = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/", queue_url)
    return m.group(1) if m else default


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of values by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class _Received:
    """What one ReceiveMessage returned, checked: what to apply and what to delete."""

    todo: list[tuple[Notification, list[Event]]] = field(default_factory=list)
    #: receipt handles of the messages in todo, in the same order
    receipts: list[str] = field(default_factory=list)
    #: receipt handles to delete without applying (too old)
    drop: list[str] = field(default_factory=list)
    done: asyncio.Future[None] | None = None


class SqsIngester:
    def __init__(
        self,
        *,
        applier: FeedbackApplier,
        verifier: Verifier,
        queue_url: str,
        region: str,
        endpoint_url: str | None = None,
        static_credentials: tuple[str, str] | None = None,
        wait_time: float = 20.0,
        max_messages: int = 10,
        receivers: int = 8,
        raw_delivery: bool = False,
        max_event_age: float = 14 * 86400.0,
        on_batch: Callable[[AppliedBatch], Awaitable[None]] | None = None,
    ) -> None:
        self.applier = applier
        self.verifier = verifier
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.static_credentials = static_credentials
        self.wait_time = int(wait_time)
        self.max_messages = max_messages
        self.receivers = receivers
        self.raw_delivery = raw_delivery
        self.max_event_age = max_event_age
        self.on_batch = on_batch
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        #: events applied, by kind (bounce, soft-bounce, complaint, delivery, ...)
        self.kinds: Counter[str] = Counter()
        self.lags: deque[float] = deque(maxlen=LAG_SAMPLE)
        #: SQS's ApproximateNumberOfMessages at the last look (-1: not known yet)
        self.backlog = -1.0
        #: held while counts, kinds and lags change or are copied: stats() is called from
        #: the relay's main thread while the ingester's thread applies batches
        self._lock = threading.Lock()
        self._inbox: asyncio.Queue[_Received] = asyncio.Queue()
        #: receives whose messages are not committed yet, at most (INFLIGHT per receiver)
        self._slots = asyncio.Semaphore(receivers * INFLIGHT)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.run(), name="feedback-ingester")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def client(self) -> Any:
        """An aioboto3 SQS client (async context manager)."""
        kwargs: dict[str, Any] = {}
        if self.static_credentials:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self.static_credentials
        session = aioboto3.Session(region_name=self.region, **kwargs)
        config = AioConfig(read_timeout=self.wait_time + 10, connect_timeout=5,
                           max_pool_connections=self.receivers + 4,
                           retries={"total_max_attempts": 1, "mode": "standard"})
        return session.client("sqs", endpoint_url=self.endpoint_url, config=config)

    async def run(self) -> None:
        async with self.client() as sqs:
            event(log, "feedback_polling", queue=self.queue_url, receivers=self.receivers)
            loops = [self._apply_loop(sqs), self._backlog_loop(sqs)]
            loops += [self._receive_loop(sqs) for _ in range(self.receivers)]
            await asyncio.gather(*loops)

    async def _receive_loop(self, sqs: Any) -> None:
        backoff = 1.0
        while True:
            # a bounded number of receives wait for their commit: while one transaction
            # runs, the next batch gathers (one transaction for many receives), and the
            # messages stay invisible for the visibility timeout, not a growing inbox
            await self._slots.acquire()
            try:
                got = await self.receive(sqs)
                backoff = 1.0
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:  # noqa: BLE001 - keep polling whatever happens
                self._slots.release()
                backoff = await self._failed(exc, backoff)
                continue
            if got.done is None:
                self._slots.release()
            else:
                got.done.add_done_callback(lambda _: self._slots.release())
                self._inbox.put_nowait(got)

    async def _failed(self, exc: BaseException, backoff: float) -> float:
        self.counts["errors"] += 1
        event(log, "feedback_error", level=logging.WARNING, error=str(exc), retry_in=backoff)
        await asyncio.sleep(backoff)
        return min(backoff * 2, 60.0)

    async def _apply_loop(self, sqs: Any) -> None:
        backoff = 1.0
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            try:
                await self.commit(sqs, batch)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - left in SQS: received again later
                backoff = await self._failed(exc, backoff)
            finally:
                for got in batch:
                    if got.done is not None and not got.done.done():
                        got.done.set_result(None)

    async def _backlog_loop(self, sqs: Any) -> None:
        while True:
            try:
                attrs = await sqs.get_queue_attributes(
                    QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"])
                self.backlog = float(attrs["Attributes"]["ApproximateNumberOfMessages"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a gauge, never a reason to stop
                self.backlog = -1.0
                event(log, "feedback_backlog_unknown", level=logging.DEBUG, error=str(exc))
            await asyncio.sleep(BACKLOG_INTERVAL)

    async def receive(self, sqs: Any) -> _Received:
        """One ReceiveMessage, each message checked; done is set when there is work."""
        resp = await sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_time,
        )
        got, now = _Received(), time.time()
        for msg in resp.get("Messages", []):
            checked = await self.check(msg.get("Body", ""), str(msg.get("MessageId", "")), now)
            if isinstance(checked, str):
                got.drop.append(msg["ReceiptHandle"])
            elif checked is not None:
                got.todo.append(checked)
                got.receipts.append(msg["ReceiptHandle"])
        if got.todo or got.drop:
            got.done = asyncio.get_running_loop().create_future()
        return got

    async def check(self, body: str, sqs_id: str, now: float
                    ) -> tuple[Notification, list[Event]] | str | None:
        """The message parsed and its events; "too_old"; or None (left for the redrive)."""
        try:
            note = parse(body)
            todo = events(note)
            if note.envelope is not None:
                await self.verifier.verify(note.envelope)
            elif not self.raw_delivery:
                raise Rejected("raw SES JSON without an SNS envelope (feedback.raw_delivery "
                               "is off)")
        except Unparseable as exc:
            self._refuse("unparseable", sqs_id, exc)
            return None
        except Rejected as exc:
            self._refuse("rejected", sqs_id, exc)
            return None
        except (OSError, aiohttp.ClientError) as exc:
            event(log, "sns_cert_unavailable", level=logging.WARNING, error=str(exc))
            return None
        if now - event_time(note, todo) > self.max_event_age:
            self.counts["too_old"] += 1
            event(log, "feedback_too_old", level=logging.WARNING, sqs_message_id=sqs_id,
                  kind=note.kind, ses_message_id=note.ses_message_id,
                  age=round(now - event_time(note, todo)))
            return "too_old"
        return note, todo

    def _refuse(self, outcome: str, sqs_id: str, exc: Exception) -> None:
        self.counts[outcome] += 1
        event(log, f"feedback_{outcome}", level=logging.WARNING, sqs_message_id=sqs_id,
              error=str(exc), total=self.counts[outcome])

    async def commit(self, sqs: Any, received: list[_Received]) -> list[AppliedBatch]:
        """Apply what the receives returned in one transaction (split when the database
        refuses it); then delete from SQS what was applied. Raises when nothing was."""
        items = [(t, r) for got in received for t, r in zip(got.todo, got.receipts, strict=True)]
        batches, done, failed = await self._apply(items) if items else ([], [], [])
        if failed and not batches:
            raise failed[0][1]
        for (note, _), exc in failed:
            self.counts["errors"] += 1
            event(log, "feedback_not_applied", level=logging.WARNING, kind=note.kind,
                  ses_message_id=note.ses_message_id, error=str(exc))
        await self.delete([*done, *(r for got in received for r in got.drop)], sqs)
        for batch in batches:
            await self._applied(batch)
        return batches

    async def _apply(self, items: list[_Item]
                     ) -> tuple[list[AppliedBatch], list[str], list[_Failed]]:
        """The committed batches, the receipts they applied, and each notification that
        failed alone with its error; a batch refused for its data is tried in halves."""
        try:
            batch = await self.applier.apply_batch([t for t, _ in items])
            return [batch], [r for _, r in items], []
        except Exception as exc:  # noqa: BLE001 - split, or left in SQS for the redrive
            if len(items) == 1 or transient(exc):
                return [], [], [(t, exc) for t, _ in items]
        half = len(items) // 2
        first, second = await self._apply(items[:half]), await self._apply(items[half:])
        return first[0] + second[0], first[1] + second[1], first[2] + second[2]

    async def _applied(self, batch: AppliedBatch) -> None:
        """Count, log and hand over one committed batch."""
        self.count(batch)
        if batch.suppressed:
            event(log, "feedback_suppressed", addresses=batch.suppressed)
        event(log, "feedback_batch", level=logging.DEBUG, notifications=len(batch.outcomes),
              events=len(batch.events), outcomes=dict(Counter(batch.outcomes)))
        if self.on_batch is not None and batch.events:
            await self.on_batch(batch)

    def count(self, batch: AppliedBatch) -> None:
        """Add a committed batch to the numbers stats() reports."""
        with self._lock:
            for outcome in batch.outcomes:
                self.counts[outcome] += 1
            self.kinds.update(batch.kinds)
            self.lags.extend(batch.lags())

    async def delete(self, receipts: list[str], sqs: Any) -> None:
        """DeleteMessageBatch, ten at a time, concurrently; a failure is a duplicate later."""

        async def ten(chunk: list[str]) -> None:
            try:
                resp = await sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)])
                failed = resp.get("Failed") or []
            except botocore.exceptions.ClientError as exc:
                failed = [{"Message": str(exc)}]
            if failed:
                # committed already; a redelivery is a duplicate and changes nothing
                event(log, "feedback_delete_failed", level=logging.WARNING,
                      failed=len(failed), error=str(failed[0].get("Message", "")))

        await asyncio.gather(*(ten(receipts[i:i + 10]) for i in range(0, len(receipts), 10)))

    async def poll_once(self, sqs: Any) -> int:
        """One ReceiveMessage applied and deleted (tests); returns how many were deleted."""
        got = await self.receive(sqs)
        if got.done is None:
            return 0
        batches = await self.commit(sqs, [got])
        return sum(len(b.outcomes) for b in batches) + len(got.drop)

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics: messages by outcome, events by kind, lag, backlog."""
        with self._lock:  # a copy: the ingester's thread adds kinds and lags meanwhile
            counts, kinds, lags = dict(self.counts), dict(self.kinds), list(self.lags)
        out = {f"feedback_{k}": float(v) for k, v in counts.items()}
        out.update({f"feedback_kind_{k}": float(v) for k, v in kinds.items()})
        out.update(feedback_lag_p50=percentile(lags, 0.5), feedback_lag_p99=percentile(lags, 0.99),
                   feedback_backlog=self.backlog)
        return out
