"""smtp.workers = "auto": the number of cores this process may use, like nginx's
worker_processes auto.

The CPU affinity mask (taskset, a container's cpuset), lowered by a cgroup v2 CPU quota
(/sys/fs/cgroup/cpu.max: "quota period", rounded up) where one is set. Reads that one
file; called by relay.config when it resolves the setting.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: the value that asks for one worker per usable core
AUTO = "auto"
#: the most worker processes smtp.workers may ask for
MAX_WORKERS = 64
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


__all__ = ["AUTO", "MAX_WORKERS", "quota_cores", "usable_cores"]
