"""Ingress limits: connection caps per relay and per client, and AUTH failure throttling.

Pure bookkeeping with time passed in (no sockets, no files): the SMTP ingress asks
ConnectionLimiter whether a new connection may stay and AuthThrottle how long to delay
a failed AUTH and whether a client address is locked out. Built by relay.ingress.server.Ingress.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


class ConnectionLimiter:
    """Counts open connections, in total and per client address."""

    def __init__(self, *, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.open.values())

    def acquire(self, client: str) -> str:
        """Take a slot for `client`; returns "" on success, else which cap was hit."""
        if self.count >= self.total:
            return "smtp.max_connections"
        if self.open[client] >= self.per_client:
            return "smtp.max_connections_per_client"
        self.open[client] += 1
        return ""

    def release(self, client: str) -> None:
        if self.open[client] <= 1:
            self.open.pop(client, None)
        else:
            self.open[client] -= 1


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass
class AuthThrottle:
    """Failed AUTH attempts per client address.

    Each failure after the first costs a growing delay (delay x failures so far, at most
    30 s); at max_failures the address is refused for `lockout` seconds. Failures older
    than `lockout` are forgotten; a success clears the address.
    """

    delay: float
    max_failures: int
    lockout: float
    clock: Callable[[], float] = time.monotonic
    clients: dict[str, _Failures] = field(default_factory=dict)

    def _entry(self, client: str, now: float) -> _Failures:
        entry = self.clients.get(client)
        if entry is None or (now - entry.last > self.lockout and now >= entry.locked_until):
            entry = self.clients[client] = _Failures()
        return entry

    def locked(self, client: str) -> float:
        """Seconds left in the client's lockout, 0 if it may try."""
        now = self.clock()
        entry = self.clients.get(client)
        if entry is None or now >= entry.locked_until:
            return 0.0
        return entry.locked_until - now

    def failure(self, client: str) -> float:
        """Record a failure; returns the delay to impose before answering."""
        now = self.clock()
        entry = self._entry(client, now)
        entry.count += 1
        entry.last = now
        if entry.count >= self.max_failures:
            entry.locked_until = now + self.lockout
        if len(self.clients) > 10000:
            self._prune(now)
        return min(self.delay * (entry.count - 1), 30.0)

    def success(self, client: str) -> None:
        self.clients.pop(client, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, e in self.clients.items()
                    if now - e.last > self.lockout and now >= e.locked_until]:
            del self.clients[key]
