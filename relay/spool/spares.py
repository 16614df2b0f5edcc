"""Spare files: a finished message's file, emptied, takes a later message.

Creating a file costs a new inode, far more than renaming one: on ext4 without a journal,
after many deletions, bench/spool.py measured ~250 against ~50 us of CPU per message
created, published and removed. So the group commit moves a finished message's file into
incoming/ under a spare name instead of unlinking it (Spool.retire); once the flush that
makes its removal from active/ durable is done, recycle() empties it and keeps it, and
the next message is written into it (create). A spare whose flush failed is deleted,
never reused: its old entry in active/ may still be on disk. Spares are named
.spare-<pid>-<n>, at most SPARES per process; recovery at start-up removes any left by a
process that died, close() those of a process that stops. Used by relay.spool.spool.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

#: empty files one process keeps for its next messages
SPARES = 256
PREFIX = ".spare-"


class Spares:
    """The empty files of one process, in one incoming/ directory (a "dir/" string)."""

    def __init__(self, incoming: str) -> None:
        self.incoming = incoming
        self._free: collections.deque[str] = collections.deque()
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._closing = False  #: close() has run: none is kept any more

    def __len__(self) -> int:
        return len(self._free)

    def name(self) -> str | None:
        """A path in incoming/ for a new spare; None when enough wait."""
        if len(self._free) >= SPARES:
            return None
        return f"{self.incoming}{PREFIX}{os.getpid()}-{next(self._names)}"

    def create(self, path: str) -> int:
        """A new empty file at `path`, open for writing: a spare renamed there when one
        waits (no new inode), else created."""
        while self._free:
            try:
                spare = self._free.popleft()
            except IndexError:
                break  # taken by another thread meanwhile
            try:
                os.rename(spare, path)
            except FileNotFoundError:
                continue  # removed meanwhile (a start-up's recovery)
            try:
                return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)

    def recycle(self, retired: Iterable[Path], *, reuse: bool) -> None:
        """After the flush that made their removal from active/ durable (`reuse`), each
        spare is emptied and kept, up to SPARES. The rest are deleted: graves of the older
        layout, spares beyond SPARES, and every one after a flush that failed."""
        for path in retired:
            name = str(path)
            if reuse and path.name.startswith(PREFIX) and self._keep(name):
                continue
            if os.path.isdir(name):
                shutil.rmtree(name, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(name)

    def _keep(self, spare: str) -> bool:
        if len(self._free) >= SPARES:
            return False
        try:
            os.truncate(spare, 0)
        except OSError:
            return False  # a directory of the older layout, or gone: removed by the caller
        with self._lock:  # against close(): none is kept after it has run
            if self._closing:
                return False
            self._free.append(spare)
        return True

    def forget(self) -> None:
        """Recovery emptied incoming/: none of the kept ones is there any more."""
        self._free.clear()

    def close(self) -> None:
        """At exit: every kept spare is deleted (incoming/ is left empty)."""
        with self._lock:
            self._closing = True
            spares = list(self._free)
            self._free.clear()
        for spare in spares:
            with contextlib.suppress(OSError):
                os.unlink(spare)


__all__ = ["PREFIX", "SPARES", "Spares"]
