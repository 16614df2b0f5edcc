"""Lanes at delivery: which lane sends next, and the ready mail of each lane.

choose() is the decision, a pure function of each lane's state: among the lanes with mail
ready, under their own rate cap and within their share of the 24-hour quota, the one
that has had the least service for its weight (virtual time = recipients sent / weight),
ties to the higher-priority lane. Idle lanes bank no credit: a lane that gets mail again
starts at the virtual time of the busy ones. LaneBook keeps that state; ReadyLanes keeps
each lane's ready messages, oldest due first. Pure: time is passed in. Used by the scheduler.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config_lanes import LanesConfig


@dataclass(frozen=True)
class LaneView:
    """One lane as choose() sees it."""

    name: str
    #: mail ready to send
    ready: bool
    #: recipients sent so far divided by the lane's weight
    vtime: float
    #: the lane's own rate cap lets it send again from this time on
    free_at: float = 0.0
    #: within its share of the 24-hour quota
    quota_ok: bool = True


def choose(lanes: Sequence[LaneView], now: float) -> str | None:
    """The lane whose message goes next (None: no lane may send now). `lanes` are in
    priority order, highest first; ties go to the higher-priority lane."""
    best: LaneView | None = None
    for lane in lanes:
        if not lane.ready or not lane.quota_ok or lane.free_at > now:
            continue
        if best is None or lane.vtime < best.vtime:
            best = lane
    return best.name if best is not None else None


def quota_ok(*, share: float, n: int, remaining: float, max_24h: float,
             outstanding: int) -> bool:
    """A lane with a share below 1 sends only while the account keeps the rest of its
    24-hour quota free: remaining, less what is taken but not yet counted, minus n."""
    if share >= 1.0 or max_24h < 0 or math.isinf(remaining):
        return True
    return remaining - outstanding - n >= (1.0 - share) * max_24h - 1e-9


class LaneBook:
    """Each lane's virtual time and rate-cap clock."""

    def __init__(self, cfg: LanesConfig) -> None:
        self.cfg = cfg
        self.names = cfg.names
        self.vtime = dict.fromkeys(self.names, 0.0)
        self.free_at = dict.fromkeys(self.names, 0.0)

    def lane(self, name: str) -> str:
        """A configured lane: mail of a lane no longer configured goes with the default."""
        return name if name in self.vtime else self.cfg.default

    def woke(self, name: str, busy: Sequence[str]) -> None:
        """`name` has mail again after none: it starts level with the busy lanes."""
        others = [self.vtime[b] for b in busy if b != name]
        if others:
            self.vtime[name] = max(self.vtime[name], min(others))

    def charge(self, name: str, n: int, now: float) -> None:
        lane = self.cfg.get(name)
        self.vtime[name] += n / lane.weight
        if lane.max_rate > 0:
            self.free_at[name] = max(now, self.free_at[name]) + n / lane.max_rate


class ReadyLanes:
    """Each lane's ready messages as a heap of (due, queue id, recipients)."""

    def __init__(self, names: Sequence[str], capacity: int) -> None:
        self.heaps: dict[str, list[tuple[float, str, int]]] = {n: [] for n in names}
        #: messages ready per lane at most
        self.capacity = capacity

    def push(self, lane: str, due: float, qid: str, n: int) -> bool:
        """Queue a message; False when its lane is full."""
        heap = self.heaps[lane]
        if len(heap) >= self.capacity:
            return False
        heapq.heappush(heap, (due, qid, n))
        return True

    def pop(self, lane: str) -> tuple[str, int]:
        _, qid, n = heapq.heappop(self.heaps[lane])
        return qid, n

    def peek(self, lane: str) -> int:
        """Recipients of the lane's next message (0: none ready)."""
        heap = self.heaps[lane]
        return heap[0][2] if heap else 0

    def room(self, lane: str) -> int:
        return self.capacity - len(self.heaps[lane])

    def busy(self) -> list[str]:
        return [n for n, h in self.heaps.items() if h]

    def qsize(self) -> int:
        return sum(len(h) for h in self.heaps.values())

    def full(self) -> bool:
        return any(len(h) >= self.capacity for h in self.heaps.values())
