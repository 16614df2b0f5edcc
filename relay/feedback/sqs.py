"""The feedback ingester: long-polls the SQS queue that SES's SNS topic feeds.

ReceiveMessage (feedback.wait_time, default 20 s; up to 10 messages) with aioboto3,
applies each message through relay.feedback.applier in one database transaction, and
deletes it from SQS only after that commit. A message that cannot be parsed is logged,
counted and left alone, so the queue's redrive policy moves it to a dead-letter queue.
Writes no table itself. Built by relay.service (also against the sandbox's SQS endpoint).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aioboto3
import botocore.exceptions
from aiobotocore.config import AioConfig

from relay.feedback.applier import Applied, FeedbackApplier
from relay.feedback.parse import Unparseable, parse
from relay.log import event

log = logging.getLogger("relay.ingester")


def queue_region(queue_url: str, default: str) -> str:
    """The region in an AWS queue URL (https://sqs.<region>.amazonaws.com/...), else default."""
    m = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/", queue_url)
    return m.group(1) if m else default


class SqsIngester:
    def __init__(
        self,
        *,
        applier: FeedbackApplier,
        queue_url: str,
        region: str,
        endpoint_url: str | None = None,
        static_credentials: tuple[str, str] | None = None,
        wait_time: float = 20.0,
        max_messages: int = 10,
        on_applied: Callable[[Applied], Awaitable[None]] | None = None,
    ) -> None:
        self.applier = applier
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.static_credentials = static_credentials
        self.wait_time = int(wait_time)
        self.max_messages = max_messages
        self.on_applied = on_applied
        self.counts = {"applied": 0, "duplicate": 0, "ignored": 0, "unparseable": 0,
                       "errors": 0}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="feedback-ingester")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def client(self) -> Any:
        """An aioboto3 SQS client (async context manager)."""
        kwargs: dict[str, Any] = {}
        if self.static_credentials:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self.static_credentials
        session = aioboto3.Session(region_name=self.region, **kwargs)
        config = AioConfig(read_timeout=self.wait_time + 10, connect_timeout=5,
                           retries={"total_max_attempts": 1, "mode": "standard"})
        return session.client("sqs", endpoint_url=self.endpoint_url, config=config)

    async def run(self) -> None:
        async with self.client() as sqs:
            event(log, "feedback_polling", queue=self.queue_url)
            backoff = 1.0
            while True:
                try:
                    await self.poll_once(sqs)
                    backoff = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep polling whatever happens
                    self.counts["errors"] += 1
                    event(log, "feedback_error", level=logging.WARNING, error=str(exc),
                          retry_in=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)

    async def poll_once(self, sqs: Any) -> int:
        """One ReceiveMessage; returns how many messages were deleted."""
        resp = await sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_time,
        )
        deleted = 0
        for msg in resp.get("Messages", []):
            if await self.handle(msg.get("Body", ""), str(msg.get("MessageId", ""))):
                try:
                    await sqs.delete_message(QueueUrl=self.queue_url,
                                             ReceiptHandle=msg["ReceiptHandle"])
                    deleted += 1
                except botocore.exceptions.ClientError as exc:
                    # committed already; a redelivery is a duplicate and changes nothing
                    event(log, "feedback_delete_failed", level=logging.WARNING, error=str(exc))
        return deleted

    async def handle(self, body: str, sqs_id: str = "") -> bool:
        """Apply one message body; True when it may be deleted (committed or ignorable)."""
        try:
            note = parse(body)
            applied = await self.applier.apply(note)
        except Unparseable as exc:
            self.counts["unparseable"] += 1
            event(log, "feedback_unparseable", level=logging.WARNING, sqs_message_id=sqs_id,
                  error=str(exc), unparseable_total=self.counts["unparseable"])
            return False
        self.counts[applied.outcome] += 1
        event(log, "feedback", kind=note.kind, outcome=applied.outcome,
              ses_message_id=note.ses_message_id, recipients=applied.suppressed,
              suppressed=len(applied.suppressed))
        if self.on_applied is not None and applied.outcome == "applied":
            await self.on_applied(applied)
        return True
