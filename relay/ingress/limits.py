"""Ingress limits: who may relay, connection caps, and AUTH failure throttling.

Pure bookkeeping with time passed in (no sockets, no files): the SMTP ingress asks
Networks whether a peer is in smtp.allowed_networks or smtp.allow_plain_auth_from,
ConnectionLimiter whether a new connection may stay, ConnectionRate whether a client
address opens connections too fast (smtp.connection_rate_limit) and AuthThrottle how long to delay
a failed AUTH and whether a client address is locked out. Built by relay.ingress.server.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class Networks:
    """A set of IP networks, asked about a peer as the transport names it.

    `peer in networks` is True only for an (address, port, ...) tuple whose address lies in
    one of them; an IPv4 client on a dual-stack socket (::ffff:a.b.c.d) counts as IPv4.
    A Unix socket's path, None or anything unparsable is in no network.
    """

    #: addresses remembered at most (then forgotten all at once)
    MEMORY = 4096

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        #: the answer for each address asked about: a session asks at connect, MAIL and
        #: each RCPT, and parsing the address costs more than the rest of the check
        self._known: dict[str, bool] = {}

    def __contains__(self, peer: object) -> bool:
        if not self.networks or not isinstance(peer, tuple) or not peer:
            return False
        host = peer[0]
        if not isinstance(host, str):
            return self._inside(host)
        known = self._known.get(host)
        if known is None:
            if len(self._known) >= self.MEMORY:
                self._known.clear()
            known = self._known[host] = self._inside(host)
        return known

    def _inside(self, host: object) -> bool:
        try:
            addr = ipaddress.ip_address(host)  # type: ignore[arg-type] # checked below
        except (TypeError, ValueError):
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


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
class ConnectionRate:
    """Connections per client address per `window` seconds, Postfix's anvil style.

    Every attempt counts, refused ones too; a limit of 0 admits everything. The count of an
    address starts again `window` seconds after its first connection of the window.
    """

    limit: int
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    clients: dict[str, tuple[float, int]] = field(default_factory=dict)

    def allow(self, client: str) -> bool:
        """Count a connection from `client`; False when it is over the limit."""
        if not self.limit:
            return True
        now = self.clock()
        start, count = self.clients.get(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        self.clients[client] = (start, count + 1)
        if len(self.clients) > 10000:
            for key in [k for k, (t, _) in self.clients.items() if now - t >= self.window]:
                del self.clients[key]
        return count + 1 <= self.limit


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
