"""Header changes made at acceptance, on bytes: the rest of the message is never re-encoded.

The relay removes Bcc fields, adds Date and Message-ID when missing (at the end of the
header block) and prepends its Received line; everything else, folding and line endings
included, stays byte for byte. Called by relay.ingress.server before the spool write, so the spool
holds exactly what is sent.
"""

from __future__ import annotations

import email.utils
import functools
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True)
class Split:
    """A message cut into header fields (each with its own line endings) and the rest."""

    fields: list[bytes]
    rest: bytes  # the empty line and the body, or b"" when there is no body
    newline: bytes

    def names(self) -> list[bytes]:
        """Each field's name, lowercased (b"" for none)."""
        return self.lowered

    @functools.cached_property
    def lowered(self) -> list[bytes]:
        # worked out once: the From check, the X-SES-* strip and prepare() all ask
        out = []
        for f in self.fields:
            m = _FIELD.match(f)
            out.append(m.group(1).lower() if m else b"")
        return out

    def join(self) -> bytes:
        return b"".join(self.fields) + self.rest


#: the end of a field: a line break not followed by a continuation line's space or tab
_FIELD_END = re.compile(rb"\n(?![ \t])")


def split(data: bytes) -> Split:
    """Cut at the first empty line; continuation lines stay with their field.

    Linear in the size of the header block: each field (with all its continuation lines) is
    found by one regular-expression search and cut out once, never grown line by line.
    """
    fields: list[bytes] = []
    pos = 0
    first = data.find(b"\n")
    newline = b"\n" if first >= 0 and data[first - 1:first] != b"\r" else b"\r\n"
    while pos < len(data):
        if data.startswith((b"\r\n", b"\n"), pos):
            break  # the empty line
        if data[pos:pos + 1] in (b" ", b"\t") or not _FIELD.match(data, pos):
            if not fields:
                # not a header at all: no header block, everything is body
                return Split([], data, newline)
            break  # a line that is not a field ends the header block
        m = _FIELD_END.search(data, pos)
        end = len(data) if m is None else m.end()
        fields.append(data[pos:end])
        pos = end
    if fields and not fields[-1].endswith(b"\n"):
        fields[-1] += newline
    return Split(fields, data[pos:], newline)


def rfc5322_date(now: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(now, UTC))


def received_line(*, helo: str, client: str, hostname: str, protocol: str, now: float) -> str:
    """The relay's Received field, folded with "\n\t" (prepare() sets the line ending)."""
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:100] or "unknown"
    return (f"Received: from {helo} ([{client}])\n\tby {hostname} (relay) with {protocol};"
            f"\n\t{rfc5322_date(now)}")


def prepare(data: bytes, *, received: str, hostname: str, now: float,
            parts: Split | None = None) -> bytes:
    """The message as it will be stored and sent (see the module docstring); `parts` is
    split(data) when the caller has it already."""
    parts = split(data) if parts is None else parts
    nl = parts.newline
    names = parts.names()
    fields = [f for f, n in zip(parts.fields, names, strict=True) if n != b"bcc"]
    if b"date" not in names:
        fields.append(f"Date: {rfc5322_date(now)}".encode() + nl)
    if b"message-id" not in names:
        token = secrets.token_hex(12)
        fields.append(f"Message-ID: <{int(now)}.{token}@{hostname}>".encode() + nl)
    # no header block at all: the body must still follow an empty line
    rest = parts.rest if parts.fields or not data else nl + data
    head = received.replace("\n", "\r\n" if nl == b"\r\n" else "\n").encode() + nl
    return head + b"".join(fields) + rest
