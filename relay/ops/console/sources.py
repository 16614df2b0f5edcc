"""What the console reads from the running relay, as plain values: the pool's pause and
holds, the account's rate and quota, the reputation rates against their lines, readiness.

Reputation is read through reputation_of() alone, the one place that knows the guard's
shape: a per-lane guard adds rows (Line with a lane) and every page shows them. Built by
relay.service (Sources), read by relay.ops.console.app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.delivery.ports import Account
from relay.spool.queue import Queue
from relay.store.db import Database
from relay.store.suppression import SuppressionList

#: SES reviews an account at these rates and may pause it at the next ones
SES_REVIEW_BOUNCE, SES_REVIEW_COMPLAINT = 0.05, 0.001
SES_PAUSE_BOUNCE, SES_PAUSE_COMPLAINT = 0.10, 0.005


@dataclass(frozen=True)
class Line:
    """Rates of one lane ("" = the whole account) against the guard's lines."""

    lane: str
    sent: int
    bounces: int
    complaints: int
    max_bounce_rate: float
    max_complaint_rate: float
    min_sample: int = 0
    paused: str = ""

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class Status:
    """The running relay's state at one instant."""

    paused: bool = False
    paused_reason: str = ""
    #: why the relay itself holds delivery (spool or database cannot record)
    holds: tuple[str, ...] = ()
    account: Account | None = None
    #: recipients/s the limiter allows (the lower of delivery.max_rate and SES's)
    configured_rate: float = 0.0
    reputation: tuple[Line, ...] = ()
    lanes: tuple[str, ...] = ()


def reputation_of(guard: Any) -> tuple[Line, ...]:
    """The guard's last rates as Lines: the account's, then one per lane when the guard
    keeps them (a `lanes` mapping of lane -> rates, or `last_by_lane`)."""
    rates = getattr(guard, "last", None)
    lines = []
    if rates is not None:
        lines.append(Line("", int(rates.sent), int(rates.bounces), int(rates.complaints),
                          float(guard.max_bounce_rate), float(guard.max_complaint_rate),
                          int(getattr(guard, "min_sample", 0))))
    per_lane = getattr(guard, "last_by_lane", None) or {}
    for lane, r in sorted(per_lane.items()):
        lines.append(Line(str(lane), int(r.sent), int(r.bounces), int(r.complaints),
                          float(getattr(r, "max_bounce_rate", guard.max_bounce_rate)),
                          float(getattr(r, "max_complaint_rate", guard.max_complaint_rate)),
                          int(getattr(guard, "min_sample", 0)), str(getattr(r, "paused", ""))))
    return tuple(lines)


@dataclass(frozen=True)
class Sources:
    """Everything the console reads, wired once by relay.service."""

    queue: Queue
    db: Database
    suppressions: SuppressionList
    status: Callable[[], Status]
    #: every readiness problem (/readyz's lines), [] when ready
    readiness: Callable[[], Awaitable[list[str]]]
    #: the embedded sandbox's outbox, when ses.endpoint_url = "sandbox"
    sandbox_dir: Path | None = None
    lanes: tuple[str, ...] = field(default=())
