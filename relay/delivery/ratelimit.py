"""Send-rate limiting: SES counts every recipient against the per-second rate and quota.

RateLimiter grants recipients at an even pace and, on top, never lets the grants in any
window of `window` seconds (1 s plus a guard for jitter between leaving the relay and
arriving at SES) exceed the rate, so SES never sees a second above it. A throttle answer
cuts the rate by a quarter and widens the guard a little; the rate recovers slowly.
Quota tracks the remaining 24-hour allowance read from GetAccount. Pure: time is passed
in; only acquire() sleeps. Used by the delivery pool. Relays that share one SES account
also take each call from a RateBudget (relay.store.budget on PostgreSQL) at the last moment.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

#: Wall-clock time at which the current task's call left the limiter. The SES adapter
#: passes it to SES-compatible test endpoints, which count the rate on it.
DEPARTURE: contextvars.ContextVar[float] = contextvars.ContextVar("relay_departure")


class RateBudget(Protocol):
    """A rate shared with other relays on the same SES account."""

    async def take(self, n: int, *, rate: float) -> None:
        """Return once n recipients may leave now without the relays together exceeding
        `rate` in any one-second window; the caller sends them at once (no await)."""


class RateLimiter:
    def __init__(
        self,
        rate: float,
        *,
        budget: RateBudget | None = None,
        window: float = 1.0,
        guard: float = 0.015,
        recovery_per_second: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be above 0")
        self.configured = rate
        #: the account's rate shared with other relays (None: this relay alone)
        self.budget = budget
        self.base_window = window
        self.window = window + guard
        self.recovery_per_second = recovery_per_second
        self.clock = clock
        self._factor = 1.0
        self._factor_at = 0.0
        self._next = 0.0
        self._grants: deque[tuple[float, int]] = deque()
        self._in_window = 0
        self._departures: deque[tuple[float, int]] = deque()
        self._departed = 0
        self._lock = asyncio.Lock()

    # -- rate -----------------------------------------------------------------------

    def set_rate(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be above 0")
        self.configured = rate

    def rate(self, now: float) -> float:
        """The rate in force at `now`: the configured rate, lowered after throttling."""
        if self._factor < 1.0:
            elapsed = max(0.0, now - self._factor_at)
            self._factor = min(1.0, self._factor + elapsed * self.recovery_per_second)
            self._factor_at = now
        return self.configured * self._factor

    def capacity(self, now: float) -> int:
        """The most recipients one grant (one SES call) may carry at `now`."""
        return max(1, math.floor(self.rate(now) + 1e-9))

    def throttled(self, now: float) -> None:
        """SES said too fast: lower the rate by a quarter (down to a tenth), pause the pace,
        and widen the jitter guard (up to 5%): a 429 at a known rate means calls arrived
        closer together than they left."""
        self.rate(now)
        self._factor = max(0.1, self._factor * 0.75)
        self.window = min(self.base_window * 1.05, self.window + 0.005)
        self._factor_at = now
        self._next = max(self._next, now + 1.0 / self.rate(now))

    # -- grants ---------------------------------------------------------------------

    def reserve(self, n: int, now: float) -> float:
        """Book n recipients; returns the time (>= now) at which they may be sent."""
        cap = self.capacity(now)
        if n > cap:
            raise ValueError(f"{n} recipients exceed the per-call capacity {cap}")
        t = max(now, self._next)
        while True:
            while self._grants and self._grants[0][0] <= t - self.window:
                self._in_window -= self._grants.popleft()[1]
            if self._in_window + n <= cap:
                break
            # wait for the oldest grant to leave the window (pop it: float-safe)
            oldest, k = self._grants.popleft()
            self._in_window -= k
            t = max(t, oldest + self.window)
        self._grants.append((t, n))
        self._in_window += n
        self._next = t + n / self.rate(now)
        return t

    def depart(self, n: int, now: float) -> float:
        """Record n recipients leaving at `now`, or return how long to wait first.

        reserve() plans on booked times, but a busy event loop can wake a call late, and a
        late call followed by one on time would put more than the rate into one second
        at SES. This second check runs on actual departure times, just before the call.
        """
        cap = self.capacity(now)
        while self._departures and self._departures[0][0] <= now - self.window:
            self._departed -= self._departures.popleft()[1]
        if self._departed + n <= max(cap, n):
            self._departures.append((now, n))
            self._departed += n
            return 0.0
        need = self._departed + n - cap
        for t, k in self._departures:
            need -= k
            if need <= 0:
                return max(t + self.window - now, 0.001)
        return self.window  # pragma: no cover - unreachable: need <= departed

    async def acquire(self, n: int) -> None:
        """Wait until n recipients may be sent; returns just before they go."""
        async with self._lock:
            at = self.reserve(n, self.clock())
        delay = at - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        for _ in range(1000):
            if self.budget is not None:
                # last, so nothing waits between the shared grant and the departure
                await self.budget.take(n, rate=self.rate(self.clock()))
            wait = self.depart(n, self.clock())
            if wait <= 0:
                DEPARTURE.set(time.time())
                return
            await asyncio.sleep(wait)


class Quota:
    """The 24-hour sending allowance: Max24HourSend minus SentLast24Hours, less our sends.

    GetAccount's SentLast24Hours is a snapshot taken while the request is in flight, and
    sends go on meanwhile: a send in flight when it was asked, or made since, may be
    missing from it. So update() takes the mark() read when the account was asked and
    counts every recipient taken and not yet confirmed by SES at that moment as still to
    be added, never letting a late answer hand back allowance the relay already used.
    """

    def __init__(self) -> None:
        self.max_24h: float = -1.0
        self.remaining: float = math.inf
        #: recipients taken and not given back, and those of them SES confirmed (sent)
        self.taken = 0
        self.confirmed = 0

    def mark(self) -> int:
        """Read just before asking the account; pass it to update() with the answer."""
        return self.confirmed

    def update(self, max_24h: float, sent_24h: float, *, mark: int | None = None) -> None:
        self.max_24h = max_24h
        if max_24h < 0:
            self.remaining = math.inf
            return
        # sent by this relay but perhaps not counted in sent_24h yet (none if unmarked)
        uncounted = max(0, self.taken - mark) if mark is not None else 0
        self.remaining = max(0.0, max_24h - sent_24h - uncounted)

    def take(self, n: int) -> int:
        """Take up to n recipients from the allowance; returns how many were granted."""
        granted = int(min(n, self.remaining))
        self.remaining -= granted
        self.taken += granted
        return granted

    def sent(self, n: int) -> None:
        """SES accepted a call of n recipients taken from the allowance."""
        self.confirmed += n

    def exhaust(self) -> None:
        """SES said the daily quota is used up, whatever GetAccount last said."""
        self.remaining = 0.0

    def give_back(self, n: int) -> None:
        """n recipients taken were not sent after all (paused meanwhile, or refused)."""
        self.taken -= n
        if self.remaining != math.inf:
            self.remaining += n
