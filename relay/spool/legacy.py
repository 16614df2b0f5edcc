"""The spool layout before one-file messages, and its conversion.

Earlier relays kept a message as a directory <state>/<qid>/ holding message.eml and
envelope.json. Start-up recovery (relay.spool.spool.Spool.recover) converts every such
directory in active/, deferred/, hold/ and failed/ into one file, streaming, one message
at a time; until then (a queue command on a spool no relay has opened since the upgrade)
they are read where they are. corrupt/ is left as it is. Used by relay.spool.spool only.

A conversion survives a crash at any point, and the message is in exactly one place:
  1. <state>/.<qid>.new is written (record line + MIME, the directory's mtime) and synced;
  2. the directory is renamed to <state>/.<qid>.old (dot names are never scanned);
  3. .<qid>.new is renamed to <qid> and the state directory synced;
  4. .<qid>.old is deleted.
`finish` completes or undoes a conversion a crash interrupted before anything else runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from relay.spool.files import fsync_dir
from relay.spool.record import Record

MESSAGE = "message.eml"
ENVELOPE = "envelope.json"


def is_legacy(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def read_record(path: Path) -> Record:
    """The record of a message directory (raises OSError, ValueError, KeyError...)."""
    return Record.from_json((path / ENVELOPE).read_bytes())


def read_message(path: Path) -> bytes:
    return (path / MESSAGE).read_bytes()


def convert(state_dir: Path, qid: str, *, sync: bool) -> bool:
    """Turn the message directory state_dir/qid into one file; False (and untouched) when
    it is not a readable message: delivery then moves it to corrupt/ with the reason."""
    old = state_dir / qid
    try:
        record = read_record(old)
        data = read_message(old)
        mtime = os.stat(old).st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return False
    new = state_dir / f".{qid}.new"
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, record.to_head())
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.utime(new, (mtime, mtime))  # deferred/: the mtime is the next attempt
    os.rename(old, state_dir / f".{qid}.old")
    os.rename(new, old)
    if sync:
        fsync_dir(state_dir)
    shutil.rmtree(state_dir / f".{qid}.old", ignore_errors=True)
    return True


def finish(state_dir: Path, *, sync: bool) -> None:
    """Complete (or undo) the conversions a crash interrupted in one state directory."""
    with os.scandir(state_dir) as it:
        names = [e.name for e in it if e.name.startswith(".")
                 and e.name.endswith((".new", ".old"))]
    for name in names:
        qid = name[1:-4]
        target, new, old = state_dir / qid, state_dir / f".{qid}.new", state_dir / f".{qid}.old"
        if name.endswith(".old"):
            if os.path.lexists(target):
                shutil.rmtree(old, ignore_errors=True)  # step 4 left undone
            elif new.exists():
                os.rename(new, target)  # step 3 left undone: .new was synced in step 1
                if sync:
                    fsync_dir(state_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, target)  # cannot happen; keep the original, convert again
        elif not old.exists() and is_legacy(target):
            with contextlib.suppress(FileNotFoundError):
                new.unlink()  # step 1 interrupted: the directory is still the message


def upgrade(state_dir: Path, *, sync: bool) -> int:
    """Convert every message directory in a state directory; returns how many."""
    finish(state_dir, sync=sync)
    n = 0
    with os.scandir(state_dir) as it:
        for entry in it:
            if (not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
                    and convert(state_dir, entry.name, sync=sync)):
                n += 1
    return n


__all__ = ["ENVELOPE", "MESSAGE", "convert", "finish", "is_legacy", "read_message",
           "read_record", "upgrade"]
