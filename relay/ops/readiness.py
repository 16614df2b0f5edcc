"""What /readyz checks, one reason per dependency that is not there.

The spool: a file can be created in it (read-only, immutable, missing) and its file
system has spool.min_free_bytes free. The database: answers and takes a write (rolled
back). SES: the last SES_WINDOW SendEmail calls did not all fail the way an unreachable
or refusing SES does (SesWatch wraps the pool's Sender). Wired by relay.service.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import text

from relay.delivery.ports import Sender
from relay.errors import ConfigurationError, DeliveryError, TransientError
from relay.spool.record import SesOptions
from relay.store.db import Database

#: SendEmail calls looked at: when all of them failed, SES is not answering.
SES_WINDOW = 5
#: Seconds the database check waits for a lock or an answer.
DB_TIMEOUT = 2.0
PROBE = ".readyz-probe"


def spool_problems(root: Path, min_free_bytes: int) -> list[str]:
    """Why the spool cannot take mail: not writable (with the OS's reason) or too full."""
    probe = root / "incoming" / f"{PROBE}.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [f"spool {root} is not writable: {exc.strerror or exc}"]
    try:
        st = os.statvfs(root)
    except OSError as exc:
        return [f"spool {root}: {exc.strerror or exc}"]
    free = st.f_bavail * st.f_frsize
    # less than one block is full even when spool.min_free_bytes is 0
    if free < max(min_free_bytes, st.f_frsize):
        return [f"spool {root} is full: {free} bytes free, below spool.min_free_bytes "
                f"({min_free_bytes})"]
    return []


def ses_verdict(outcomes: Sequence[str], last_error: str, *, window: int = SES_WINDOW) -> str:
    """"" while SES answers, else why not. outcomes: the recent calls' labels, oldest first
    ("ok", "transient", "configuration", "throttled", "permanent", "paused")."""
    recent = list(outcomes)[-window:]
    if len(recent) < window:
        return ""
    if all(o == "transient" for o in recent):
        return f"SES not answering: the last {window} calls failed: {last_error}"
    if all(o == "configuration" for o in recent):
        return f"SES refusing the relay's calls: the last {window} failed: {last_error}"
    return ""


class SesWatch:
    """A Sender that remembers how the last calls ended, for /readyz."""

    def __init__(self, inner: Sender, *, window: int = SES_WINDOW) -> None:
        self.inner = inner
        self.window = window
        self.outcomes: collections.deque[str] = collections.deque(maxlen=window)
        self.last_error = ""

    async def send_raw(self, *, sender: str, recipients: Sequence[str], raw: bytes,
                       options: SesOptions | None = None) -> str:
        try:
            answer = await self.inner.send_raw(sender=sender, recipients=recipients, raw=raw,
                                               options=options)
        except TransientError as exc:
            self._failed("transient", exc)
            raise
        except ConfigurationError as exc:
            self._failed("configuration", exc)
            raise
        except DeliveryError:
            self.outcomes.append("other")  # SES answered: throttled, permanent, paused
            raise
        self.outcomes.append("ok")
        return answer

    def _failed(self, label: str, exc: DeliveryError) -> None:
        self.outcomes.append(label)
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]

    def problem(self) -> str:
        return ses_verdict(self.outcomes, self.last_error, window=self.window)


async def database_problems(db: Database, *, timeout: float = DB_TIMEOUT) -> list[str]:
    """Nothing when the database answers and takes a write (rolled back), else why not."""
    try:
        await asyncio.wait_for(_probe(db, timeout), timeout * 2)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        first = str(exc).splitlines()[0] if str(exc) else ""
        return [f"database {db.engine.url.render_as_string(hide_password=True)} "
                f"cannot take a write: {type(exc).__name__}: {first}"[:300]]
    return []


_INSERT = "INSERT INTO relay_state (key, value, updated_at) VALUES (:key, '', 0)"


async def _probe(db: Database, timeout: float) -> None:
    path = db.engine.url.database
    if db.engine.dialect.name == "sqlite" and path and path != ":memory:":
        await asyncio.to_thread(_probe_sqlite, path, timeout)
        return
    async with db.engine.connect() as conn:
        await conn.execute(text(f"SET LOCAL lock_timeout = {int(timeout * 1000)}"))
        try:
            await conn.execute(text(_INSERT), {"key": PROBE})
        finally:
            await conn.rollback()


def _probe_sqlite(path: str, timeout: float) -> None:
    # SQLite hands a new connection a descriptor an earlier one opened (before the file
    # became read-only), and closing one of ours would drop its locks: ask the kernel
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(name) and not os.access(name, os.W_OK):
            raise PermissionError(f"{name} is read-only")
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout,
                           isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_INSERT.replace(":key", "?"), (PROBE,))
        conn.execute("ROLLBACK")
    finally:
        conn.close()
