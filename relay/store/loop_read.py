"""Point reads of the SQLite database on the event loop: the delivery-time suppression check.

A read-only sqlite3 connection of its own, used on the loop instead of a hop to the
aiosqlite thread and back. It cannot wait on anything: the database is in WAL mode, where
readers never wait for writers, and its busy timeout is 0, so a lock (a checkpoint that
truncates, recovery after a crash) gives SQLITE_BUSY at once and the caller falls back to
the async engine. Every read is its own transaction: it sees every commit made before it
began. Reads `suppressions`; writes nothing. Used by relay.store.suppression.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from relay.log import event

log = logging.getLogger("relay.store")

#: Addresses per SELECT (SQLite's bound-parameter limit is 999 on old builds).
CHUNK = 500
#: SELECTs of 1..SHAPES addresses keep one prepared statement each; longer lists are read
#: in runs of SHAPES (the sqlite3 module caches the statements by their text).
SHAPES = 16


def _select(n: int) -> str:
    marks = ", ".join("?" * n)
    return f"SELECT address FROM suppressions WHERE address IN ({marks})"


_SQL = [""] + [_select(n) for n in range(1, SHAPES + 1)]


class LoopReader:
    """A read-only connection to one SQLite file, opened on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        #: the thread that opened the connection (the relay's loop): the only one using it
        self._thread = 0
        #: the connection could not be opened: every read goes to the async path
        self.broken = False
        #: reads that fell back to the async path (busy, or an error); for tests
        self.fallbacks = 0

    def _open(self) -> sqlite3.Connection | None:
        if self._conn is not None:
            # another thread's loop (not the relay's) takes the async path
            return self._conn if self._thread == threading.get_ident() else None
        if not self.broken:
            try:
                # mode=ro: this connection can never write (or hold a write lock);
                # timeout=0: a lock is reported at once, never waited for on the loop
                conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True,
                                       timeout=0, isolation_level=None,
                                       check_same_thread=False, cached_statements=SHAPES + 8)
                conn.execute("PRAGMA query_only = 1")
            except sqlite3.Error as exc:
                self.broken = True
                event(log, "loop_read_unavailable", level=logging.WARNING,
                      path=str(self.path), error=str(exc))
                return None
            self._conn, self._thread = conn, threading.get_ident()
        return self._conn

    def suppressed(self, addresses: Sequence[str]) -> set[str] | None:
        """The addresses (normalized) on the list; None when the database is busy or the
        read failed: the caller asks the async engine instead, which waits for the lock."""
        conn = self._open()
        if conn is None:
            return None
        hits: set[str] = set()
        try:
            for i in range(0, len(addresses), SHAPES):
                part = addresses[i:i + SHAPES]
                # fetchall steps the statement to its end, so its read transaction is over
                # when it returns: the next read starts a new one, never an old snapshot
                hits.update(a for (a,) in conn.execute(_SQL[len(part)], part).fetchall())
        except sqlite3.Error:
            self.fallbacks += 1
            return None
        return hits

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def sqlite_path(url: str) -> Path | None:
    """The file of an `sqlite+aiosqlite:///PATH` URL; None for other databases and for
    in-memory SQLite (a second connection would see another database)."""
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix):].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


__all__ = ["CHUNK", "LoopReader", "sqlite_path"]
