"""The spool's file work: whole writes and reads, the kernel copy, and the syncs a group
commit shares (relay.spool.spool.Spool builds on Durable). Filesystem only; used by
relay.spool.spool and relay.spool.commit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

from relay.errors import SpoolError, SpoolFullError
from relay.spool.record import State

#: bytes read for a record alone (the scheduler's lane lookup); longer records read on
HEAD_BLOCK = 4096
#: files written but not yet synced beyond which a writer syncs its own (bounds the fds)
MAX_PENDING_FILES = 256


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take only part of them)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def writev_all(fd: int, head: bytes, data: bytes) -> None:
    n = os.writev(fd, (head, data))
    if n < len(head) + len(data):
        write_all(fd, (head + data)[n:])


def read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def read_file(path: str | Path, *, whole: bool, limit: int = -1) -> bytes | None:
    """A spool file's bytes: all of them (one read; None when more than `limit`), or
    enough for its record line."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if whole:
            size = os.fstat(fd).st_size
            return None if 0 <= limit < size else read_all(fd, size)
        data = os.read(fd, HEAD_BLOCK)
        while b"\n" not in data:
            more = os.read(fd, HEAD_BLOCK * 16)
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def mime_head(path: Path, size: int) -> bytes:
    """Up to `size` bytes of the MIME after a spool file's record line."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.read(fd, HEAD_BLOCK + size)
        while b"\n" not in raw:
            more = os.read(fd, HEAD_BLOCK * 16)
            if not more:
                return b""
            raw += more
        start = raw.index(b"\n") + 1
        if len(raw) < start + size:
            raw += read_all(fd, start + size - len(raw))
        return raw[start:start + size]
    finally:
        os.close(fd)


def copy(src: int, dst: int, offset: int, count: int) -> None:
    """count bytes of src from offset to dst's position: in the kernel where it can."""
    try:
        while count > 0:
            n = os.copy_file_range(src, dst, count, offset)
            if n == 0:
                return
            offset, count = offset + n, count - n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        write_all(dst, os.pread(src, count, offset))


def rename_unlocked(src: Path, dst: Path) -> bool:
    """Rename src to dst under src's flock (relay.spool.spool.Spool.locked), taken
    without waiting: False when src is gone, locked, or replaced meanwhile."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(src, follow_symlinks=False).st_ino:
            return False
        os.rename(src, dst)
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)
    return True


def as_spool_error(exc: BaseException) -> BaseException:
    """OSError -> SpoolError (SpoolFullError when out of space); anything else unchanged."""
    if isinstance(exc, SpoolError) or not isinstance(exc, OSError):
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool full: {exc}")
    return SpoolError(f"spool write failed: {exc}")


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


def syncfs(fd: int, root: Path) -> None:
    """syncfs(2) through a descriptor on the spool's root, held open since the spool
    started: it reports the write-back errors seen since that descriptor was opened."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs {root}: {os.strerror(err)}")


def whole_filesystem(root: Path) -> bool:
    """Whether the spool is a filesystem of its own (a mount point), so that one syncfs
    flushes the spool's changes and nobody else's."""
    return _syncfs is not None and os.path.ismount(root)


class Durable:
    """What a spool changed and has not yet synced, and the flush that syncs it.

    A flush that fails may have carried changes of callers other than the one that ran
    it (whatever was noted when it started), and Linux reports a write-back error once:
    the next flush of the same file succeeds although its data is gone. So every failure
    is counted: a caller takes `since()` before its changes and `check(since)` after its
    flush, and fails too when any flush failed in between (relay.spool.commit).
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        #: each state's directory as a string: the per-message calls (exists, read,
        #: bury) join a name to it instead of building a Path (5 us each, measured)
        self.dirs = {state: f"{self.root / state.value}/" for state in State}
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._dirty_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._files: list[int] = []  #: written, not yet fdatasynced (closed by flush)
        self._dirs: set[State] = set()  #: changed, not yet fsynced
        self.converted = 0  #: messages of the older layout converted by recover()
        #: flush by one syncfs (the spool is a filesystem of its own), decided at the first
        self.syncfs: bool | None = None
        self._root_fd = -1  #: the root, open from the start on (syncfs reports through it)
        self.failures = 0  #: flushes that failed
        self.failure: OSError | None = None  #: the last one's error

    def open(self) -> None:
        """At start: hold the root open, so that a later syncfs reports every write-back
        error from now on (one opened per flush would miss those before it)."""
        with self._dirty_lock:
            if self._root_fd < 0 and self.fsync:
                self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        with self._dirty_lock:
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1

    def since(self) -> int:
        """Taken before a change whose flush is shared; see check."""
        return self.failures

    def check(self, since: int) -> None:
        """After the caller's flush: SpoolError (SpoolFullError when out of space) when a
        flush failed since `since`: it may have carried the caller's changes."""
        if self.failures != since:
            failure = self.failure or OSError(errno.EIO, "spool flush failed")
            err = as_spool_error(failure)
            raise err from failure

    def crowded(self) -> bool:
        """Whether so many written files wait for a flush that a new one syncs itself."""
        return self.fsync and len(self._files) >= MAX_PENDING_FILES

    def _written(self, fd: int, *, synced: bool = False) -> None:
        """Leave a new file's sync to the next flush (it closes the descriptor); one
        `synced` already (prepare, when crowded) is only closed."""
        if self.fsync and not synced:
            with self._dirty_lock:
                self._files.append(fd)
        else:
            os.close(fd)

    def _changed(self, state: State) -> None:
        if self.fsync:
            with self._dirty_lock:
                self._dirs.add(state)

    def flush(self) -> None:
        """Make every change noted so far durable. Raises OSError on a write-back error
        (and counts it: see check).

        On a filesystem of its own, one syncfs: a single journal commit and device flush
        for everything. Elsewhere an fdatasync per file written, then an fsync per
        directory changed, so that other programs' writes stay out of it (measured by
        bench/spool.py: each fdatasync costs a device flush of its own, so a batch of 20
        waited 2-6 times longer than one syncfs; CPU alike). A failure does not stop the
        rest from being synced, and the directories it changed are synced again by the
        next flush.

        One flush at a time: a second caller waits for the one running, so a change
        noted before a call is always synced (or counted as failed) before that call
        returns.
        """
        with self._flush_lock:
            with self._dirty_lock:
                files, self._files = self._files, []
                dirs, self._dirs = self._dirs, set()
            if self.syncfs is None:
                self.syncfs = whole_filesystem(self.root)
            try:
                self._sync(files, dirs)
            except OSError as exc:
                self.failures += 1
                self.failure = exc
                with self._dirty_lock:
                    # a rename or unlink it carried is durable only once a later fsync of
                    # its directory succeeds: the next flush syncs these again (a result
                    # retried in memory finds its file gone and relies on that flush)
                    self._dirs |= dirs
                raise

    def _sync(self, files: list[int], dirs: set[State]) -> None:
        failure: OSError | None = None
        for fd in files:
            try:
                if not self.syncfs:
                    os.fdatasync(fd)
            except OSError as exc:
                failure = failure or exc
            finally:
                os.close(fd)
        if self.syncfs:
            if files or dirs:
                self.open()
                syncfs(self._root_fd, self.root)
        else:
            for state in sorted(dirs):
                try:
                    fsync_dir(self.root / state.value)
                except OSError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure
