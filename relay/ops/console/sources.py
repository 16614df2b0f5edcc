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
    #: sends the rates are over (with a known or settled outcome)
    sent: int
    bounce_rate: float
    complaint_rate: float
    max_bounce_rate: float
    max_complaint_rate: float
    #: sends needed before the guard judges (0: the guard's own statistics decide)
    min_sample: int = 0
    paused: str = ""
    #: sends whose outcome is not known yet (not counted as clean)
    unknown: int = 0


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
    """The guard's last findings as Lines, the account first, then each lane.

    Two shapes are read: a per-lane guard's `scopes` (scope -> counts, lines, paused; the
    account under "*"), or a single account-wide guard's `last` rates with its
    max_bounce_rate / max_complaint_rate / min_sample.
    """
    scopes = getattr(guard, "scopes", None)
    if isinstance(scopes, dict):
        lines = []
        for scope, found in scopes.items():
            c, lim = found.counts, found.lines
            lines.append(Line("" if scope == "*" else str(scope), int(c.judged),
                              float(c.bounce_rate), float(c.complaint_rate),
                              float(lim.bounce), float(lim.complaint), 0,
                              str(found.paused or ""), int(getattr(c, "unknown", 0))))
        return tuple(sorted(lines, key=lambda ln: (ln.lane != "", ln.lane)))
    rates = getattr(guard, "last", None)
    if rates is None:
        return ()
    reason = str(guard.paused_reason()) if callable(getattr(guard, "paused_reason", None)) \
        else ""
    return (Line("", int(rates.sent), float(rates.bounce_rate), float(rates.complaint_rate),
                 float(guard.max_bounce_rate), float(guard.max_complaint_rate),
                 int(getattr(guard, "min_sample", 0)),
                 reason if reason.startswith("reputation:") else ""),)


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
