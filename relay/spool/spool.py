"""The durable message spool: Postfix-style state directories under one root.

A message is one file, <state>/<queue id>: its relay.spool.record.Record as one line of
JSON, then the raw MIME exactly as received (`head -1` shows the envelope and delivery
state, `tail -n +2` the message byte for byte). It is written in incoming/ and becomes
visible by one rename into active/; every state change is one rename; a new record
replaces the file by write-temporary, sync, rename; a finished message is one unlink. A
deferred file's mtime is its next attempt, so a scan needs no parsing. Directories in the
older layout (message.eml + envelope.json) are converted at start-up (relay.spool.legacy).
Used by ingress, delivery, the queue commands and the console (never by path).

Why one file (bench/spool.py: per message accepted, read and finished, in group commits
of 20): the directory of two files took 42.5 system calls and 750-780 us of CPU, two flat
files 20.3 and 350-510 us, one file 13.3 and 250-320 us, the record in an xattr 12.3 and
210-390 us but then `cat` no longer shows the record and it needs an fsync, not an
fdatasync. Most mail is accepted, sent once and removed, so the record is rewritten only on
a deferral or a partial send, and the rewrite copies the MIME in the kernel.

Durability: the plain calls (accept, save, move, discard) are durable when they return.
The split ones (prepare/publish, and save/move/bury with durable=False) note what they
changed and leave the sync to flush() (relay.spool.files.Durable), which
relay.spool.commit.GroupCommit calls once for every change waiting at that moment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from relay.errors import SpoolError, SpoolFullError
from relay.spool import legacy
from relay.spool.files import (
    HEAD_BLOCK,
    Durable,
    as_spool_error,
    copy,
    fsync_dir,
    mime_head,
    read_file,
    rename_unlocked,
    write_all,
    writev_all,
)
from relay.spool.record import Envelope, Record, State, new_queue_id


class CorruptMessage(SpoolError):
    """A message whose files cannot be read; it has been moved to corrupt/."""


class Spool(Durable):
    # -- layout ---------------------------------------------------------------------

    def ensure(self) -> None:
        for state in State:
            (self.root / state.value).mkdir(parents=True, exist_ok=True)

    def dir(self, state: State) -> Path:
        return self.root / state.value

    def path(self, state: State, qid: str) -> Path:
        return self.root / state.value / qid

    def exists(self, state: State, qid: str) -> bool:
        return os.path.lexists(self.dirs[state] + qid)

    def locate(self, qid: str) -> State | None:
        """The state a queue id is in, or None when it is not in the spool."""
        for state in State:
            if state is not State.INCOMING and self.exists(state, qid):
                return state
        return None

    # -- acceptance -----------------------------------------------------------------

    def accept(self, envelope: Envelope, data: bytes, *, qid: str | None = None) -> str:
        """Make a message durable in active/ and return its queue id.

        Returns only after its file, and its entry in active/, are on disk. On any
        failure nothing is left behind and SpoolError is raised.
        """
        since = self.since()
        qid = self.prepare(envelope, data, qid=qid)
        try:
            self.flush()
            self.publish(qid)
            self.flush()
            self.check(since)  # a flush failed that may have carried this file
        except BaseException as exc:
            self.abandon(qid)
            err = as_spool_error(exc)
            if err is exc:
                raise
            raise err from exc
        return qid

    def prepare(self, envelope: Envelope, data: bytes, *, qid: str | None = None,
                inline: bool = False) -> str:
        """Write a message as incoming/<qid> (not yet synced, not yet visible): one
        create, one write, its sync left to the next flush (its own when crowded(), but
        never `inline`, on the event loop: the caller checked crowded() first).

        The first half of a group-committed accept: flush(), publish(qid), flush() follow.
        On failure nothing is left behind and SpoolError is raised.
        """
        qid = qid or new_queue_id()
        path = self.dirs[State.INCOMING] + qid
        record = Record(id=qid, envelope=envelope, size=len(data))
        fd = -1
        try:
            self._check_room(len(data))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            writev_all(fd, record.to_head(), data)
            synced = not inline and self.crowded()
            if synced:
                os.fdatasync(fd)  # bounds the descriptors waiting for a flush
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            err = as_spool_error(exc)
            if err is exc:
                raise
            raise err from exc
        self._written(fd, synced=synced)
        return qid

    def publish(self, qid: str) -> None:
        """Make a prepared message visible: one rename from incoming/ into active/."""
        os.rename(self.dirs[State.INCOMING] + qid, self.dirs[State.ACTIVE] + qid)
        self._changed(State.ACTIVE)

    def abandon(self, qid: str) -> None:
        """Remove a prepared message that was never acknowledged, wherever it got to."""
        for state in (State.INCOMING, State.ACTIVE):
            with contextlib.suppress(OSError):
                os.unlink(self.path(state, qid))
        if self.fsync:
            with contextlib.suppress(OSError):
                fsync_dir(self.dir(State.ACTIVE))

    def _check_room(self, size: int) -> None:
        if self.min_free_bytes <= 0:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes + size:
            raise SpoolFullError(
                f"spool has {free} bytes free, below spool.min_free_bytes={self.min_free_bytes}"
            )

    # -- reading --------------------------------------------------------------------

    def _legacy(self, state: State, qid: str, *, body: bool) -> tuple[Record, bytes]:
        """A message directory of the older layout; unreadable ones to corrupt/."""
        path = self.path(state, qid)
        try:
            record = legacy.read_record(path)
        except FileNotFoundError:
            if not path.exists():
                raise
            raise self.to_corrupt(state, qid, f"{legacy.ENVELOPE} missing") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self.to_corrupt(state, qid, f"{legacy.ENVELOPE} unreadable: {exc}") from exc
        if not body:
            return record, b""
        try:
            data = legacy.read_message(path)
        except FileNotFoundError:
            if not path.is_dir():
                raise
            raise self.to_corrupt(state, qid, f"{legacy.MESSAGE} missing") from None
        return record, data

    def _parse(self, state: State, qid: str, raw: bytes) -> tuple[Record, int]:
        try:
            return Record.from_head(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise self.to_corrupt(state, qid, f"record line unreadable: {exc}") from exc

    def load(self, state: State, qid: str) -> Record:
        """The record of a message; an unreadable one is moved to corrupt/."""
        try:
            raw = read_file(self.path(state, qid), whole=False) or b""
        except IsADirectoryError:
            return self._legacy(state, qid, body=False)[0]
        return self._parse(state, qid, raw)[0]

    def peek(self, state: State, qid: str) -> Record | None:
        """The record, or None when unreadable; never moves anything (unlike load)."""
        path = self.path(state, qid)
        try:
            if legacy.is_legacy(path):
                return legacy.read_record(path)
            return Record.from_head(read_file(self.path(state, qid), whole=False) or b"")[0]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read(self, state: State, qid: str) -> tuple[Record, bytes]:
        """A message's record and raw MIME, in one read of its file. One shorter or
        longer than the size recorded at acceptance is moved to corrupt/
        (CorruptMessage), never forwarded."""
        got = self.read_small(state, qid, -1)
        assert got is not None
        return got

    def read_small(self, state: State, qid: str, limit: int) -> tuple[Record, bytes] | None:
        """read(), or None when the file is over `limit` bytes (nothing read)."""
        try:
            raw = read_file(self.dirs[state] + qid, whole=True, limit=limit)
        except IsADirectoryError:
            record, data = self._legacy(state, qid, body=True)
        else:
            if raw is None:
                return None
            record, start = self._parse(state, qid, raw)
            data = raw[start:]
        if len(data) != record.size:
            raise self.to_corrupt(state, qid, f"message is {len(data)} bytes, "
                                              f"its record says {record.size}")
        return record, data

    def read_message(self, state: State, qid: str, record: Record | None = None) -> bytes:
        """The raw MIME. With its record, checked as by read (one that does not match is
        moved to corrupt/); without, as it is, never moving anything (OSError when it
        cannot be read)."""
        if record is not None:
            return self.read(state, qid)[1]
        path = self.path(state, qid)
        if legacy.is_legacy(path):
            return legacy.read_message(path)
        raw = read_file(path, whole=True) or b""
        start = raw.find(b"\n")
        if start < 0:
            raise OSError(errno.EBADMSG, "no record line: not a spool file", str(path))
        return raw[start + 1:]

    def read_head(self, state: State, qid: str, size: int = 65536) -> bytes:
        """Up to `size` bytes from the start of the raw MIME, for its headers; never
        moves anything."""
        path = self.path(state, qid)
        if legacy.is_legacy(path):
            with open(path / legacy.MESSAGE, "rb") as fh:
                return fh.read(size)
        return mime_head(path, size)

    def to_corrupt(self, state: State, qid: str, reason: str) -> CorruptMessage:
        """Move an entry that is not a complete message to corrupt/<name>/ with a
        reason.txt (a file goes inside a directory of its own name); the error to raise.
        Never deletes anything. If the move fails the entry stays where it was."""
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
                fsync_dir(self.dir(state))
                fsync_dir(self.dir(State.CORRUPT))
        except OSError as exc:
            return CorruptMessage(f"{qid}: {reason} (not moved to corrupt/: {exc})")
        return CorruptMessage(f"{qid}: {reason}")

    # -- state changes --------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, state: State, qid: str) -> Iterator[int]:
        """An exclusive flock on a message's file, held while it is still the one at its
        path; FileNotFoundError when it was moved or replaced meanwhile.

        Every replace (save) and every operator rename or delete takes it, so that a
        rename never lands on a file about to be replaced (that would leave two copies).
        """
        path = self.path(state, qid)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise FileNotFoundError(errno.ENOENT, "moved or replaced meanwhile", str(path))
            yield fd
        finally:
            os.close(fd)

    def save(self, state: State, record: Record, *, durable: bool = True) -> State:
        """Replace a message's record atomically and durably; returns its state.

        With durable=False the caller flushes (group commit) before relying on it. The
        file is looked up again where an operator moved it meanwhile (hold, release), and
        never recreated where it no longer is; a message found in no state raises
        FileNotFoundError (deleted).
        """
        for _ in range(5):
            try:
                if legacy.is_legacy(self.path(state, record.id)):
                    legacy.convert(self.dir(state), record.id, sync=self.fsync)
                with self.locked(state, record.id) as fd:
                    self.replace(state, fd, record, durable=durable)
                return state
            except FileNotFoundError:
                found = self.locate(record.id)
                if found is None:
                    raise
                state = found
            except OSError as exc:
                raise SpoolError(f"{record.id}: could not save state: {exc}") from exc
        raise SpoolError(f"{record.id}: could not save state: the message keeps moving")

    def replace(self, state: State, fd: int, record: Record, *, durable: bool = True) -> None:
        """Under `locked`: write the record and the file's MIME to a temporary file, sync
        it, rename it over the message; its directory synced now or by the next flush."""
        head = os.pread(fd, HEAD_BLOCK, 0)
        while b"\n" not in head:
            more = os.pread(fd, HEAD_BLOCK * 16, len(head))
            if not more:
                break
            head += more
        start = head.index(b"\n") + 1 if b"\n" in head else len(head)
        tmp = self.path(State.INCOMING, f".save-{record.id}")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            # a nearly full disk may take part of a write: never rename a truncated file
            write_all(out, record.to_head())
            copy(fd, out, start, os.fstat(fd).st_size - start)
            if self.fsync:
                os.fdatasync(out)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):  # give back what the half copy took
                os.unlink(tmp)
            raise
        os.close(out)
        os.rename(tmp, self.path(state, record.id))
        self._synced(state, durable)

    def _synced(self, state: State, durable: bool) -> None:
        if durable and self.fsync:
            fsync_dir(self.dir(state))
        else:
            self._changed(state)

    def move(self, qid: str, src: State, dst: State, *, when: float | None = None,
             durable: bool = True) -> None:
        """Rename a message from one state to another; `when` sets its mtime (deferred:
        the next attempt; a crash that loses it only makes the message due sooner)."""
        with self.locked(src, qid):
            if when is not None:
                os.utime(self.path(src, qid), (when, when))
            os.rename(self.path(src, qid), self.path(dst, qid))
        if when is not None and legacy.is_legacy(self.path(dst, qid)):
            os.utime(self.path(dst, qid), (when, when))  # a directory's rename touches it
        self._synced(dst, durable)

    def discard(self, state: State, qid: str) -> None:
        """Remove a finished message: one unlink, durable on return."""
        grave = self.bury(state, qid)
        if self.fsync:
            fsync_dir(self.dir(state))
        if grave is not None:
            shutil.rmtree(grave, ignore_errors=True)

    def bury(self, state: State, qid: str) -> Path | None:
        """The first half of discard: the unlink (not yet flushed). Once flushed, the
        message is gone for good. A directory of the older layout is renamed into
        incoming/ instead; that directory, garbage, is returned for the caller (or the
        next start-up) to delete."""
        path = self.dirs[state] + qid
        try:
            os.unlink(path)
        except IsADirectoryError:
            grave = self.path(State.INCOMING, f".done-{qid}")
            os.rename(path, grave)
            self._changed(state)
            return grave
        self._changed(state)
        return None

    def remove(self, state: State, qid: str) -> None:
        """An operator's delete: under the lock, so no result in flight lands after it."""
        with self.locked(state, qid):
            grave = self.bury(state, qid)
        self._synced(state, True)
        if grave is not None:
            shutil.rmtree(grave, ignore_errors=True)

    # -- scanning -------------------------------------------------------------------

    def scan(self, state: State) -> Iterator[str]:
        """Queue ids in a state, in directory order, without loading them."""
        with os.scandir(self.dir(state)) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    yield entry.name

    def next_attempts(self, state: State = State.DEFERRED) -> Iterator[tuple[str, float]]:
        """(queue id, mtime) for each message in a state: one stat each, no read.
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
        """Queue ids whose mtime (next attempt) is at or before now."""
        return (qid for qid, at in self.next_attempts(state) if at <= now)

    def activate(self, qids: Iterable[str]) -> list[str]:
        """Due deferred mail back to active/: a rename each, one fsync of active/ for all.

        A rename that a crash undoes leaves the message in deferred/, still due, so none
        waits for an fsync of its own. Returns the ids moved; one gone meanwhile (held,
        deleted, taken by another scanner) or locked (a save would recreate it in
        deferred/: two copies) is skipped this scan."""
        moved = [qid for qid in qids if rename_unlocked(self.path(State.DEFERRED, qid),
                                                        self.path(State.ACTIVE, qid))]
        if moved and self.fsync:
            fsync_dir(self.dir(State.ACTIVE))
        return moved

    def count(self, state: State) -> int:
        return sum(1 for _ in self.scan(state))

    def recover(self) -> int:
        """Start-up: delete everything in incoming/ (never acknowledged), then convert
        messages of the older layout (relay.spool.legacy). Returns the count deleted."""
        self.ensure()
        n = 0
        with os.scandir(self.dir(State.INCOMING)) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                n += 1
        for state in (State.ACTIVE, State.DEFERRED, State.HOLD, State.FAILED):
            self.converted += legacy.upgrade(self.dir(state), sync=self.fsync)
        return n
