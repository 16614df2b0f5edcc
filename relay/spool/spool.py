"""The durable message spool: Postfix-style state directories under one root.

A message is one file, <state>/<queue id>: its relay.spool.record.Record as one line of
JSON, then the raw MIME exactly as received (`head -1` shows the envelope and delivery
state, `tail -n +2` the message byte for byte). It is written in incoming/ and becomes
visible by one rename into active/; every state change is one rename; a new record
replaces the file by write-temporary, sync, rename; a finished message is one unlink
(or, through the group commit, a rename into incoming/ as a spare file that a later
message is written into: see retire). A deferred file's mtime is its next attempt, so a
scan needs no parsing. Directories in the older layout (message.eml + envelope.json) are
converted at start-up (relay.spool.legacy). Used by ingress, delivery, the queue
commands and the console (never by path).

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
    as_spool_error,
    copy,
    fsync_dir,
    rename_unlocked,
    write_all,
    writev_all,
)
from relay.spool.reading import Reading
from relay.spool.record import Envelope, Record, State, new_queue_id
from relay.spool.spares import PREFIX as SPARE
from relay.spool.spares import Spares


class Spool(Reading):
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_bytes: int = 0) -> None:
        super().__init__(root, fsync=fsync, min_free_bytes=min_free_bytes)
        #: finished messages' files, emptied, for the next messages (relay.spool.spares)
        self.spares = Spares(self.dirs[State.INCOMING])

    # -- layout ---------------------------------------------------------------------

    def ensure(self) -> None:
        for state in State:
            (self.root / state.value).mkdir(parents=True, exist_ok=True)

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
            fd = self.spares.create(path)
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

    def retire(self, state: State, qid: str) -> Path | None:
        """bury() for the group commit, which flushes right after: the file is moved into
        incoming/ as a spare (relay.spool.spares) instead of unlinked; active/ loses the
        entry either way, made final by the same fsync of active/. Returns the spare (or a
        grave of the older layout) for recycle(); unlinks as bury() when enough wait."""
        spare = self.spares.name() if self.fsync else None
        if spare is None:
            return self.bury(state, qid)
        os.rename(self.dirs[state] + qid, spare)  # FileNotFoundError: moved meanwhile
        self._changed(state)
        return Path(spare)

    def recycle(self, retired: Iterable[Path], *, reuse: bool) -> None:
        """After the flush that made their removal durable (`reuse`), the spares retire()
        returned are kept for later messages; the rest (and all after a failed flush) go."""
        self.spares.recycle(retired, reuse=reuse)

    def close(self) -> None:
        self.spares.close()
        super().close()

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
        self.spares.forget()
        with os.scandir(self.dir(State.INCOMING)) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                # a spare file held no message: not counted as one removed
                n += not entry.name.startswith(SPARE)
        for state in (State.ACTIVE, State.DEFERRED, State.HOLD, State.FAILED):
            self.converted += legacy.upgrade(self.dir(state), sync=self.fsync)
        return n
