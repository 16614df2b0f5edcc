"""The durable message spool: Postfix-style state directories under one root.

A message is a directory <state>/<queue id>/ holding message.eml (the raw MIME exactly as
received) and envelope.json (its relay.spool.record.Record). It becomes visible only by an
atomic rename out of incoming/, every state change is one rename, and envelope.json is
replaced by write-temporary, fsync, rename. A deferred message's directory mtime is its
next attempt time, so a scan needs no parsing. Used by ingress, delivery and the queue CLI.

Durability comes two ways. The plain calls (accept, save, move, discard) are durable when
they return. The split calls (prepare/publish, and save/move/bury with durable=False) leave
the flush to the caller, so that many changes share one: relay.spool.commit.GroupCommit calls
flush() once for every change waiting at that moment (group commit).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from relay.errors import SpoolError, SpoolFullError
from relay.spool.record import Envelope, Record, State, new_queue_id

MESSAGE = "message.eml"
ENVELOPE = "envelope.json"


class CorruptMessage(SpoolError):
    """A message whose files cannot be read; it has been moved to corrupt/."""


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "syncfs", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


#: Linux syncfs(2): every dirty page and inode of one filesystem, one journal commit
_syncfs = _load_syncfs()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part of them)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def as_spool_error(exc: BaseException) -> BaseException:
    """OSError -> SpoolError (SpoolFullError when out of space); anything else unchanged."""
    if isinstance(exc, SpoolError) or not isinstance(exc, OSError):
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool full: {exc}")
    return SpoolError(f"spool write failed: {exc}")


class Spool:
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes

    # -- layout ---------------------------------------------------------------------

    def ensure(self) -> None:
        for state in State:
            (self.root / state.value).mkdir(parents=True, exist_ok=True)

    def dir(self, state: State) -> Path:
        return self.root / state.value

    def path(self, state: State, qid: str) -> Path:
        return self.root / state.value / qid

    def locate(self, qid: str) -> State | None:
        """The state a queue id is in, or None when it is not in the spool."""
        for state in State:
            if state is not State.INCOMING and self.path(state, qid).is_dir():
                return state
        return None

    # -- acceptance -----------------------------------------------------------------

    def accept(self, envelope: Envelope, data: bytes, *, qid: str | None = None) -> str:
        """Make a message durable in active/ and return its queue id.

        Returns only after both files, their directory and the new entry in active/ are
        on disk. On any failure nothing is left behind and SpoolError is raised.
        """
        qid = self.prepare(envelope, data, qid=qid)
        try:
            if self.fsync:
                self.flush()
            self.publish(qid)
            if self.fsync:
                self.flush()
        except BaseException as exc:
            self.abandon(qid)
            err = as_spool_error(exc)
            if err is exc:
                raise
            raise err from exc
        return qid

    def prepare(self, envelope: Envelope, data: bytes, *, qid: str | None = None) -> str:
        """Write a message into incoming/<qid>/ (not yet flushed, not yet visible).

        The first half of a group-committed accept: flush(), publish(qid), flush() follow.
        On failure nothing is left behind and SpoolError is raised.
        """
        qid = qid or new_queue_id()
        tmp = self.path(State.INCOMING, qid)
        record = Record(id=qid, envelope=envelope, size=len(data))
        try:
            self._check_room(len(data))
            tmp.mkdir()
            self._write(tmp / MESSAGE, data, sync=False)
            self._write(tmp / ENVELOPE, record.to_json(), sync=False)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            err = as_spool_error(exc)
            if err is exc:
                raise
            raise err from exc
        return qid

    def publish(self, qid: str) -> None:
        """Make a prepared message visible: one rename from incoming/ into active/."""
        os.rename(self.path(State.INCOMING, qid), self.path(State.ACTIVE, qid))

    def abandon(self, qid: str) -> None:
        """Remove a prepared message that was never acknowledged, wherever it got to."""
        for state in (State.INCOMING, State.ACTIVE):
            shutil.rmtree(self.path(state, qid), ignore_errors=True)

    def flush(self) -> None:
        """Make every change so far in the spool durable: syncfs(2) on its filesystem.

        One call covers the data, the inodes and the directory entries of every message
        written, renamed or removed before it, in one journal commit; raises OSError on a
        write-back error. Without syncfs (not Linux) the whole system is synced.
        """
        if _syncfs is None:
            os.sync()
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {self.root}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def _check_room(self, size: int) -> None:
        if self.min_free_bytes <= 0:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes + size:
            raise SpoolFullError(
                f"spool has {free} bytes free, below spool.min_free_bytes={self.min_free_bytes}"
            )

    def _write(self, path: Path, data: bytes, *, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, data)
            if sync and self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------

    def load(self, state: State, qid: str) -> Record:
        """The record of a message; an unreadable one is moved to corrupt/."""
        path = self.path(state, qid)
        try:
            return Record.from_json((path / ENVELOPE).read_bytes())
        except FileNotFoundError:
            if not path.exists():
                raise
            raise self.to_corrupt(state, qid, f"{ENVELOPE} missing") from None
        except NotADirectoryError:
            raise self.to_corrupt(state, qid, "not a message directory") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise self.to_corrupt(state, qid, f"{ENVELOPE} unreadable: {exc}") from exc

    def read_message(self, state: State, qid: str, record: Record | None = None) -> bytes:
        """message.eml; with its record, one missing or shorter than the size recorded at
        acceptance is moved to corrupt/ (CorruptMessage), never forwarded."""
        path = self.path(state, qid)
        try:
            data = (path / MESSAGE).read_bytes()
        except FileNotFoundError:
            if record is None or not path.is_dir():
                raise
            raise self.to_corrupt(state, qid, f"{MESSAGE} missing") from None
        if record is not None and len(data) != record.size:
            raise self.to_corrupt(state, qid, f"{MESSAGE} is {len(data)} bytes, "
                                              f"its envelope records {record.size}")
        return data

    def to_corrupt(self, state: State, qid: str, reason: str) -> CorruptMessage:
        """Move an entry that is not a complete message to corrupt/<name>/ with a
        reason.txt (a stray file goes inside a directory of its own name); the error to
        raise. Never deletes anything. If the move fails the entry stays where it was."""
        src, dst = self.path(state, qid), self.path(State.CORRUPT, qid)
        try:
            if dst.exists():
                dst = self.path(State.CORRUPT, f"{qid}.{new_queue_id()}")
            if src.is_dir() and not src.is_symlink():
                os.rename(src, dst)
            else:
                dst.mkdir()
                os.rename(src, dst / qid)
            (dst / "reason.txt").write_text(f"{state.value}/{qid}: {reason}\n")
            if self.fsync:
                _fsync_dir(self.dir(state))
                _fsync_dir(self.dir(State.CORRUPT))
        except OSError as exc:
            return CorruptMessage(f"{qid}: {reason} (not moved to corrupt/: {exc})")
        return CorruptMessage(f"{qid}: {reason}")

    # -- state changes --------------------------------------------------------------

    def save(self, state: State, record: Record, *, durable: bool = True) -> State:
        """Replace a message's envelope.json atomically and durably; returns its state.

        With durable=False the caller flushes (group commit) before relying on it.

        The write goes through a descriptor of the message's own directory, so it lands
        in that directory wherever an operator renamed it meanwhile (hold, release), and
        never recreates a second copy. A message found in no state raises
        FileNotFoundError (deleted). An exclusive flock on the directory orders this
        write with the queue commands' read-modify-write (relay.spool.queue).
        """
        for _ in range(5):
            try:
                fd = os.open(self.path(state, record.id), os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                found = self.locate(record.id)
                if found is None:
                    raise
                state = found
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._save_at(fd, record, durable)
                return state
            except OSError as exc:
                raise SpoolError(f"{record.id}: could not save state: {exc}") from exc
            finally:
                os.close(fd)
        raise SpoolError(f"{record.id}: could not save state: the message keeps moving")

    def _save_at(self, dir_fd: int, record: Record, durable: bool = True) -> None:
        tmp = ENVELOPE + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, dir_fd=dir_fd)
        sync = durable and self.fsync
        try:
            # a nearly full disk may take part of a write: never rename a truncated record
            _write_all(fd, record.to_json())
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):  # give back what the half copy took
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        os.rename(tmp, ENVELOPE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if sync:
            os.fsync(dir_fd)

    def move(self, qid: str, src: State, dst: State, *, when: float | None = None,
             durable: bool = True) -> None:
        """Rename a message from one state to another; `when` sets its mtime (deferred)."""
        target = self.path(dst, qid)
        if when is not None:
            # set before the rename: a scan of dst never sees it with a stale (due) mtime
            os.utime(self.path(src, qid), (when, when))
        os.rename(self.path(src, qid), target)
        if when is not None:
            os.utime(target, (when, when))  # again, where a rename touches the mtime
        if durable and self.fsync:
            if when is not None:
                _fsync_dir(target)
            _fsync_dir(self.dir(dst))

    def discard(self, state: State, qid: str) -> None:
        """Remove a finished message: one rename into incoming/ (garbage), then delete."""
        grave = self.bury(state, qid)
        if self.fsync:
            _fsync_dir(self.dir(state))
        shutil.rmtree(grave, ignore_errors=True)

    def bury(self, state: State, qid: str) -> Path:
        """The first half of discard: the rename into incoming/ (not yet flushed).

        Once flushed, the message is gone from its state for good; the returned directory
        is garbage for the caller (or the next start-up) to delete.
        """
        grave = self.path(State.INCOMING, f".done-{qid}")
        os.rename(self.path(state, qid), grave)
        return grave

    # -- scanning -------------------------------------------------------------------

    def scan(self, state: State) -> Iterator[str]:
        """Queue ids in a state, in directory order, without loading them."""
        with os.scandir(self.dir(state)) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    yield entry.name

    def next_attempts(self, state: State = State.DEFERRED) -> Iterator[tuple[str, float]]:
        """(queue id, directory mtime) for each message in a state: one stat each, no read.
        In deferred/ the mtime is the next attempt."""
        with os.scandir(self.dir(state)) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    yield entry.name, entry.stat().st_mtime
                except FileNotFoundError:
                    continue

    def due(self, now: float, state: State = State.DEFERRED) -> Iterator[str]:
        """Queue ids whose directory mtime (next attempt) is at or before now."""
        return (qid for qid, at in self.next_attempts(state) if at <= now)

    def activate(self, qids: Iterable[str]) -> list[str]:
        """Due deferred mail back to active/: a rename each, one fsync of active/ for all.

        A rename that a crash undoes leaves the message in deferred/, still due, so none
        waits for an fsync of its own. Returns the ids moved; one gone meanwhile (held,
        deleted, or taken by another scanner) is skipped.
        """
        moved = []
        for qid in qids:
            try:
                os.rename(self.path(State.DEFERRED, qid), self.path(State.ACTIVE, qid))
            except FileNotFoundError:
                continue
            moved.append(qid)
        if moved and self.fsync:
            _fsync_dir(self.dir(State.ACTIVE))
        return moved

    def count(self, state: State) -> int:
        return sum(1 for _ in self.scan(state))

    def recover(self) -> int:
        """Start-up: delete everything in incoming/ (never acknowledged). Returns the count."""
        self.ensure()
        n = 0
        with os.scandir(self.dir(State.INCOMING)) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                n += 1
        return n
