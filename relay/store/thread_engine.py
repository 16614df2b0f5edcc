"""A synchronous engine on the SQLite file, used from one thread of its own.

Through aiosqlite every statement, fetch, cursor close, commit and rollback is a hand-off
to its thread and back (a dozen for one message-log batch, each costing more CPU than the
statement). Here a whole transaction is one hand-off: the function runs in this thread on
a plain sqlite3 connection, with the same pragmas and lock timeout. It is a thread, not the
loop, because a write waits for other writers' locks and its commit for the disk. Built by
relay.store.db for SQLite; used by the message log's writer (relay.store.messages).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, event

from relay.threads import background

T = TypeVar("T")


def sqlite_pragmas(dbapi_conn: Any, _record: Any, *, busy_ms: int) -> None:
    """Every SQLite connection of the relay: WAL (readers never wait for writers) and a
    busy timeout of database.lock_timeout."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.close()


class ThreadEngine:
    """Runs fn(connection, *args) in one transaction in its own thread, one at a time."""

    def __init__(self, path: Path, *, lock_timeout: float) -> None:
        self.engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": lock_timeout})
        event.listen(self.engine, "connect", functools.partial(
            sqlite_pragmas, busy_ms=int(lock_timeout * 1000)))
        self._executor: ThreadPoolExecutor | None = None

    async def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-db",
                                                initializer=background)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, fn, args)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn: Connection
        with self.engine.begin() as conn:
            return fn(conn, *args)

    async def close(self) -> None:
        """Wait for the transaction in flight (in a thread: it may wait for a lock), then
        close the connection."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)
        self.engine.dispose()


__all__ = ["ThreadEngine", "sqlite_pragmas"]
