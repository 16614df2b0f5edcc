"""The record of SES feedback: every event per recipient, keyed for idempotency.

The one writer of the `feedback_events` table: relay.feedback.applier records a batch of
events inside its transaction (after asking which of their identity keys were seen), and
the message log's retention prune deletes old ones. Readers query the table directly: the
message log (early feedback, `relay log`), the reputation guard and the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.store.db import FeedbackEvent

#: The longest detail kept per event (the SES diagnostic can be long).
MAX_DETAIL = 2000
#: Bound parameters per IN list (SQLite's limit is 999 on old builds).
CHUNK = 400


async def seen(session: AsyncSession, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (event key, recipient) pairs already recorded, of those asked (set-based).

    The lookup goes through the recipient index (event_key has none of its own): the
    key is a digest that includes the recipient, so a pair names one event.
    """
    wanted = sorted(set(keys), key=lambda kr: kr[1])
    found: set[tuple[str, str]] = set()
    for i in range(0, len(wanted), CHUNK):
        chunk = wanted[i:i + CHUNK]
        rows = await session.execute(select(FeedbackEvent.event_key, FeedbackEvent.recipient)
                                     .where(FeedbackEvent.recipient.in_({r for _, r in chunk}),
                                            FeedbackEvent.event_key.in_({k for k, _ in chunk})))
        found.update((k, r) for k, r in rows)
    return found & set(wanted)


async def record_many(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert events (event_key, recipient, kind, ses_message_id, detail, occurred_at,
    received_at) in one executemany inside the caller's transaction."""
    if rows:
        await session.execute(insert(FeedbackEvent), [
            dict(r, detail=str(r["detail"])[:MAX_DETAIL]) for r in rows])


async def prune(session: AsyncSession, cutoff: float) -> int:
    """Delete events received before `cutoff` inside the caller's transaction."""
    res = await session.execute(delete(FeedbackEvent).where(FeedbackEvent.received_at < cutoff))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
