"""The message log's writer: queued writes committed in batches by one task.

A batch the database does not take (locked, read-only, unreachable) is kept and tried again
with a growing delay until it is written, in order; the writes held in memory are bounded
by MAX_PENDING_ROWS (past it, see BatchWriter.submit). Used by relay.store.messages; its
state feeds /readyz (problem()) and the log (log_retry, log_recovered, log_dropped).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc

from relay.log import event

log = logging.getLogger("relay.tracking")

#: How long the writer gathers writes before one commit.
BATCH_WINDOW = 0.05
#: Writes per transaction at most.
BATCH_WRITES = 500
#: Rows waiting for the database at most (about 300 bytes each: ~30 MB).
MAX_PENDING_ROWS = 100_000
#: The first retry delay after a failed commit, and the longest.
RETRY_MIN, RETRY_MAX = 0.05, 2.0


def retryable(exc: BaseException) -> bool:
    """A commit failure the database may get over (locked, read-only, down, restarting).

    Constraint, data and statement errors would fail again the same way: not retried.
    """
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError,
                        sa_exc.NotSupportedError)):
        return False
    return isinstance(exc, (sa_exc.DBAPIError, sa_exc.DisconnectionError,
                            sa_exc.TimeoutError, OSError, TimeoutError))


def retry_delay(failures: int) -> float:
    """Seconds before the next try after `failures` failed commits in a row (>= 1)."""
    return float(min(RETRY_MAX, RETRY_MIN * 2 ** max(0, failures - 1)))


@dataclass(frozen=True)
class Pending:
    """One write and how many rows it holds (the unit of the memory bound)."""

    write: Any
    rows: int


class BatchWriter:
    """Commits submitted writes in order, in batches, retrying until each is written."""

    def __init__(self, commit: Callable[[list[Any]], Awaitable[None]], *,
                 max_rows: int = MAX_PENDING_ROWS, window: float = BATCH_WINDOW) -> None:
        self.commit = commit
        self.max_rows = max_rows
        self.window = window
        self.pending: collections.deque[Pending] = collections.deque()
        self.pending_rows = 0
        #: rows of "queued" writes not kept because the bound was reached
        self.dropped_rows = 0
        #: when commits started failing (monotonic), None while they succeed
        self.failing_since: float | None = None
        self.last_error = ""
        self._work = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="message-log")

    async def stop(self, timeout: float) -> None:
        """Write what is pending within `timeout` seconds, then stop; the rest is logged."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            event(log, "log_unwritten", level=logging.ERROR, rows=self.pending_rows,
                  error=self.last_error)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        while self.pending:
            self._changed.clear()
            await self._changed.wait()

    async def submit(self, write: Any, rows: int, *, may_wait: bool) -> None:
        """Queue a write. Past the bound a write that may wait (a delivery outcome) waits
        for room, so delivery slows to what the database takes; one that may not (a
        message's "queued" rows) is not kept: its first outcome writes the row instead."""
        while self.pending_rows and self.pending_rows + rows > self.max_rows:
            if not may_wait:
                if not self._dropping:  # once per outage
                    self._dropping = True
                    event(log, "log_dropped", level=logging.ERROR, rows=rows,
                          pending=self.pending_rows, error=self.last_error)
                self.dropped_rows += rows
                return
            self._changed.clear()
            await self._changed.wait()
        self.pending.append(Pending(write, rows))
        self.pending_rows += rows
        self._work.set()

    def problem(self) -> str:
        """Why the log is behind (for /readyz), or "" while its commits succeed."""
        if self.failing_since is None:
            return ""
        return (f"database: message log cannot write ({self.pending_rows} rows waiting): "
                f"{self.last_error}")[:300]

    async def _loop(self) -> None:
        failures = 0
        while True:
            await self._work.wait()
            await asyncio.sleep(self.window if failures == 0 else retry_delay(failures))
            batch = [p for p, _ in zip(self.pending, range(BATCH_WRITES), strict=False)]
            try:
                written = await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - kept and tried again, never dropped
                failures += 1
                self._failed(exc, failures)
                continue
            if failures:
                event(log, "log_recovered", failures=failures, rows=self.pending_rows)
                failures, self.failing_since, self._dropping = 0, None, False
            self._done(written)

    async def _write(self, batch: Sequence[Pending]) -> int:
        """The batch in one transaction; if the database refuses a write for good, each on
        its own, leaving out (and logging) only the ones it refuses."""
        try:
            await self.commit([p.write for p in batch])
            return len(batch)
        except Exception as exc:
            if retryable(exc):
                raise
        for p in batch:
            try:
                await self.commit([p.write])
            except Exception as exc:
                if retryable(exc):
                    raise
                event(log, "log_error", level=logging.ERROR, rows=p.rows,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            self._done(1)  # written or refused for good: never tried again
        return 0

    def _failed(self, exc: BaseException, failures: int) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        if failures == 1 or failures % 30 == 0:
            event(log, "log_retry", level=logging.WARNING, failures=failures,
                  rows=self.pending_rows, error=self.last_error)

    def _done(self, count: int) -> None:
        for _ in range(count):
            self.pending_rows -= self.pending.popleft().rows
        if not self.pending:
            self._work.clear()
        self._changed.set()
