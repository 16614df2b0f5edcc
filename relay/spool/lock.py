"""One relay per spool, one worker per partition: exclusive locks under the spool root.

`relay serve` takes <spool>/.lock (flock, exclusive, without waiting) before it recovers
anything, so a second relay started on the same spool stops at once, naming the spool
and the holder's pid, and never clears the first one's incoming/. With several workers
the supervisor takes it and hands the descriptor to every worker, so the lock lasts until
the last of them exits (a new supervisor cannot start while old workers still finish their
calls); each worker also takes <spool>/.lock.worker-N for its partition. The kernel drops
a lock when its holders exit, even by SIGKILL: no stale lock to clean up. Operator
commands take no lock. Used by relay.service and relay.ops.workers.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from relay.errors import SpoolError

LOCK = ".lock"


class SpoolLocked(SpoolError):
    """Another process holds the lock this one needs."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


class SpoolLock:
    """An exclusive lock held for as long as its descriptor is open (here or in children)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def take(cls, root: str | os.PathLike[str], *, worker: int | None = None) -> SpoolLock:
        """Lock the spool (worker None) or one worker's partition; SpoolLocked if held."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / (LOCK if worker is None else f"{LOCK}.worker-{worker}")
        try:
            # held read-only: a descriptor open for writing would keep the spool's
            # filesystem from being remounted read-only (the pid is written apart)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(f"spool {root}: cannot open its lock file {path}: "
                             f"{exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            if worker is None:
                raise SpoolLocked(
                    f"spool {root} is in use by another relay (pid {pid}, or its worker "
                    "processes): stop it first, or give this relay a spool.dir of its own"
                ) from None
            raise SpoolLocked(
                f"spool {root}: partition {worker} is still delivered by pid {pid}: "
                "wait for that worker to exit"
            ) from None
        try:
            with open(path, "w") as out:
                out.write(f"{os.getpid()}\n")
        except OSError:
            pass  # the lock holds without its note of the holder's pid
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def held_by(root: str | os.PathLike[str]) -> str | None:
    """The pid of the relay holding the spool's lock, or None when nobody holds it (checked
    before start-up, so that a second relay names the first instead of its taken port)."""
    path = Path(root) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # a shared lock taken here goes with the descriptor
    return None


__all__ = ["LOCK", "SpoolLock", "SpoolLocked", "held_by"]
