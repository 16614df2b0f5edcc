"""The delivery pool's knobs, as one frozen value, and this process's partition of the spool.

PoolSettings carries what `[delivery]` in the configuration says about pacing, scanning
and retry waits; Partition says which messages this worker process delivers and its
share of the account's rate and quota. Pure values: no I/O. Built by relay.service (or a
test) and read by the scheduler, the account watch, the attempt and the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.config import DeliveryConfig
from relay.spool.record import partition


@dataclass(frozen=True)
class Partition:
    """Worker `index` of `count` (relay.ops.workers) delivers only its partition of the
    spool, at its share of the account's rate and 24-hour quota."""

    index: int = 0
    count: int = 1

    def owns(self, qid: str) -> bool:
        return self.count <= 1 or partition(qid, self.count) == self.index

    @property
    def share(self) -> float:
        return 1.0 / max(1, self.count)


@dataclass(frozen=True)
class PoolSettings:
    #: recipients per second; 0: the account's MaxSendRate (the lower of the two wins)
    max_rate: float = 0.0
    #: SendEmail calls in flight at most (Little's law sizes the rest)
    max_concurrency: int = 50
    #: queue ids read from active/ ahead of the workers
    ready_queue: int = 1000
    #: seconds between scans of active/ when nobody says mail arrived
    scan_interval: float = 1.0
    #: seconds a throttled message waits before its next call
    throttle_retry: float = 1.0
    #: seconds between GetAccount reads; also the wait once the 24-hour quota is used up
    account_refresh: float = 300.0
    #: seconds between GetAccount probes while sending is paused
    pause_probe_interval: float = 30.0
    partition: Partition = field(default_factory=Partition)

    @classmethod
    def from_config(cls, cfg: DeliveryConfig, *, partition: Partition | None = None
                    ) -> PoolSettings:
        return cls(max_rate=cfg.max_rate, max_concurrency=cfg.max_concurrency,
                   ready_queue=cfg.ready_queue, scan_interval=cfg.scan_interval,
                   throttle_retry=cfg.throttle_retry, account_refresh=cfg.account_refresh,
                   pause_probe_interval=cfg.pause_probe_interval,
                   partition=partition or Partition())
