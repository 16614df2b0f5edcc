"""Reading a spool file as an operator would (`head -1` for the record, `tail -n +2` for
the message): the tests that look at the spool's files directly use these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def record(path: Path) -> dict[str, Any]:
    """The record on a spool file's first line, as JSON."""
    doc: dict[str, Any] = json.loads(path.read_bytes().split(b"\n", 1)[0])
    return doc


def mime(path: Path) -> bytes:
    """The raw MIME after a spool file's record line, exactly as received."""
    return path.read_bytes().split(b"\n", 1)[1]
