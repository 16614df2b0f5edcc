"""The record of SES feedback: every event per recipient, keyed for idempotency.

The one writer of the `feedback_events` table: relay.feedback.applier records events
inside its transaction (after asking whether the notification's key was seen), and the
message log's retention prune deletes old ones. Readers query the table directly: the
message log (early feedback, `relay log`), the reputation guard and the metrics.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.store.db import FeedbackEvent

#: The longest detail kept per event (the SES diagnostic can be long).
MAX_DETAIL = 2000


async def seen(session: AsyncSession, key: str) -> bool:
    """True when a notification with this key was recorded already (a second copy)."""
    found = await session.scalar(select(FeedbackEvent.id).where(
        FeedbackEvent.event_key == key).limit(1))
    return found is not None


def record(session: AsyncSession, *, key: str, recipient: str, kind: str,
           ses_message_id: str, detail: str, occurred_at: float, received_at: float) -> None:
    """Add one recipient's event to the caller's transaction."""
    session.add(FeedbackEvent(event_key=key, recipient=recipient, kind=kind,
                              ses_message_id=ses_message_id, detail=detail[:MAX_DETAIL],
                              occurred_at=occurred_at, received_at=received_at))


async def prune(session: AsyncSession, cutoff: float) -> int:
    """Delete events received before `cutoff` inside the caller's transaction."""
    res = await session.execute(delete(FeedbackEvent).where(FeedbackEvent.received_at < cutoff))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
