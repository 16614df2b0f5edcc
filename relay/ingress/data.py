"""Reading the DATA phase in blocks instead of a line at a time.

aiosmtpd reads DATA with one `readuntil(b"\\r\\n")` per line, plus a log call and list
work per line: about 80 awaits for a 5 KB message and a third of the ingress's CPU. Here
the stream is read up to each `.\\r\\n` (in blocks of the reader's limit when none is near:
SessionReader raises it to DATA_LIMIT for the DATA phase), and a dot ends the message
only where aiosmtpd's line reader would end it: a line that is exactly `.` after a CRLF
(or first). Bare LF or bare CR before the dot do
not end it (no smuggling). Bytes after the terminating line stay in the reader for the
next command (pipelining). Byte for byte the result equals aiosmtpd's: the same content
after dot-unstuffing, the same size rule (552 past the limit, the rest drained, nothing
buffered) and the same line length rule (500 for a line over `line_limit` with its CRLF).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

NOMINAL = "nominal"
TOO_LONG = "too long"  #: a line longer than the line limit (aiosmtpd: 500)
TOO_MUCH = "too much"  #: more than the size limit (aiosmtpd: 552)

END = b".\r\n"
#: the session reader's limit while DATA is read (SessionReader.data_phase)
DATA_LIMIT = 64 * 1024


class SessionReader(asyncio.StreamReader):
    """aiosmtpd's stream reader, with a larger limit while DATA is read.

    aiosmtpd gives its reader the limit of a command line (1001 bytes), and a
    StreamReader stops reading from the socket while it holds more than twice its limit:
    every message over 2 KB then costs a pause and a resume of the socket (two epoll_ctl
    calls and the selector's bookkeeping) and read_data a block per KB. During DATA the
    limit is DATA_LIMIT; command lines keep aiosmtpd's (its "500 Command line too long").
    """

    @contextlib.contextmanager
    def data_phase(self) -> Iterator[None]:
        limit = self._limit  # type: ignore[has-type] # StreamReader's own, set in __init__
        self._limit = max(limit, DATA_LIMIT)
        try:
            yield
        finally:
            self._limit = limit


async def read_data(reader: asyncio.StreamReader, size_limit: int | None,
                    line_limit: int) -> tuple[bytes, str]:
    """The message up to the lone dot (dot-unstuffed) and NOMINAL, or b"" and the error."""
    parts: list[bytes] = []
    size = 0  #: bytes before the terminating line, as aiosmtpd counts them
    state = NOMINAL
    line = 0  #: bytes of the line the last block ended in (no CRLF seen yet)
    cr = False  #: the last block ended in a CR: its LF may open the next block
    tail = b""  #: the last bytes read, to tell whether a dot starts a line
    while True:
        try:
            block = await reader.readuntil(END)
        except asyncio.LimitOverrunError as exc:
            # no ".\r\n" within the reader's limit: take what cannot hold part of one
            block = await reader.readexactly(exc.consumed)
        seen = tail + block
        done = seen.endswith(END) and (
            (seen == END and size == 0) or seen[-len(END) - 2:-len(END)] == b"\r\n")
        tail = seen[-4:]
        if done:
            block = block[:-len(END)]
        size += len(block)
        if state == NOMINAL and block:
            state, line, cr = _lines(block, line, cr, line_limit)
        if state == NOMINAL and size_limit and size > size_limit:
            state = TOO_MUCH
        if state == NOMINAL:
            parts.append(block)
        else:
            parts.clear()  # drain the rest without holding it
        if done:
            break
    if state != NOMINAL:
        return b"", state
    data = b"".join(parts)
    # RFC 5321 4.5.2: a leading dot on any line was added by the client
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n"), NOMINAL


def _lines(block: bytes, line: int, cr: bool, line_limit: int) -> tuple[str, int, bool]:
    """Check the lines `block` completes against aiosmtpd's rule (a line with its CRLF
    may be `line_limit` bytes); returns the state and the unfinished line's length and CR."""
    if cr and block[:1] == b"\n":
        # the CRLF straddled two blocks: the line before it (CR counted) ended there
        if line - 1 + 2 > line_limit:
            return TOO_LONG, 0, False
        line, block = 0, block[1:]
    lines = block.split(b"\r\n")
    if len(lines) == 1:
        line += len(block)
    else:
        longest = max(line + len(lines[0]), max(map(len, lines[1:-1]), default=0))
        if longest + 2 > line_limit:
            return TOO_LONG, 0, False
        line = len(lines[-1])
    cr = block.endswith(b"\r")
    # an unfinished line only grows (a final CR may yet start its CRLF)
    if line - cr + 2 > line_limit:
        return TOO_LONG, 0, False
    return NOMINAL, line, cr


__all__ = ["DATA_LIMIT", "NOMINAL", "TOO_LONG", "TOO_MUCH", "SessionReader", "read_data"]
