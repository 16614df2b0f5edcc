"""smtp.workers = "auto": the number of cores this process may use, like nginx's
worker_processes auto.

The CPU affinity mask (taskset, a container's cpuset), lowered by a cgroup v2 CPU quota
(/sys/fs/cgroup/cpu.max: "quota period", rounded up) where one is set; one worker with the
embedded sandbox, which lives in the relay's one process. Reads that one file; called by
the CLI (`relay serve`, `relay check`) and relay.ops.workers through workers().
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from relay.config import SANDBOX, Config
from relay.config_values import MAX_COUNT

#: the most worker processes "auto" gives
MAX_WORKERS = MAX_COUNT
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def quota_cores(text: str) -> int | None:
    """Cores a cgroup v2 cpu.max line allows ("max 100000": no limit, None)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on, at least 1 and at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        quota = quota_cores(cpu_max.read_text())
    except OSError:
        quota = None
    if quota is not None:
        cores = min(cores, quota)
    return max(1, min(cores, MAX_WORKERS))


def workers(config: Config) -> int:
    """The worker processes `relay serve` runs: smtp.workers, or "auto" (0) resolved."""
    if config.smtp.workers:
        return config.smtp.workers
    return 1 if config.ses.endpoint_url == SANDBOX else usable_cores()


__all__ = ["MAX_WORKERS", "quota_cores", "usable_cores", "workers"]
