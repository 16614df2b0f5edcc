"""Retry policy: when to try a deferred message again, and when to give up.

Pure functions of the attempt count, the configuration and the time they are given;
no I/O. Backoff doubles from delivery.min_backoff up to delivery.max_backoff (Postfix's
300 s and 4000 s by default) with full jitter above the floor, so a fleet of relays that
all deferred at the same outage does not retry in lockstep. Called by the delivery pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0

    def ceiling(self, attempts: int) -> float:
        """The longest wait after `attempts` failed attempts (1 = the first failure)."""
        exp = min(max(attempts, 0), 60)
        return min(self.max_backoff, self.min_backoff * (2.0**exp))

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """A wait drawn uniformly between min_backoff and the ceiling for this attempt."""
        ceiling = self.ceiling(attempts)
        return (rng or random).uniform(self.min_backoff, max(ceiling, self.min_backoff))

    def expired(self, received_at: float, now: float) -> bool:
        return now - received_at >= self.max_lifetime

    def next_attempt(
        self, attempts: int, received_at: float, now: float, rng: random.Random | None = None
    ) -> float | None:
        """When to try again, or None when the message has outlived max_lifetime.

        The last attempt is made at the moment the lifetime runs out, never later.
        """
        if self.expired(received_at, now):
            return None
        return min(now + self.delay(attempts, rng), received_at + self.max_lifetime)
