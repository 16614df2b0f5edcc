"""Reading the spool: where a message is, its record, its raw MIME, and corrupt/.

The layout (a state's directory, a message's path) and every read of relay.spool.spool,
as the base class of Spool; nothing here changes a message, but an unreadable one is
moved to corrupt/ (to_corrupt) so that it is never forwarded.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from relay.errors import SpoolError
from relay.spool import legacy
from relay.spool.files import Durable, fsync_dir, mime_head, read_file
from relay.spool.record import Record, State, new_queue_id


class CorruptMessage(SpoolError):
    """A message whose files cannot be read; it has been moved to corrupt/."""


class Reading(Durable):
    # -- layout ---------------------------------------------------------------------

    def dir(self, state: State) -> Path:
        return self.root / state.value

    def path(self, state: State, qid: str) -> Path:
        return self.root / state.value / qid

    def exists(self, state: State, qid: str) -> bool:
        return os.path.lexists(self.dirs[state] + qid)

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


__all__ = ["CorruptMessage", "Reading"]
