"""relay.ingress.content: line endings, long lines and the header From, by tables; and the
header split's work measured in Python line events, which must not grow with the number
of continuation lines of a folded field."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest

from relay.ingress import content, headers
from relay.ingress.credentials import User


@pytest.mark.parametrize("data, out, reply", [
    (b"From: a@x\r\n\r\nhi\r\n", b"From: a@x\r\n\r\nhi\r\n", None),
    (b"From: a@x\n\nhi\n", b"From: a@x\r\n\r\nhi\r\n", None),
    (b"From: a@x\r\n\nhi\r\n", b"From: a@x\r\n\r\nhi\r\n", None),
    (b"From: a@x\r\n\r\nhi\n.\nsmuggled\r\n", b"From: a@x\r\n\r\nhi\r\n.\r\nsmuggled\r\n", None),
    (b"From: a@x\r\n\r\nhi\r.\r\n", None, content.BARE_CR),
    (b"From: a@x\rBcc: b@y\r\n\r\nhi\r\n", None, content.BARE_CR),
    (b"From: a@x\r\n\r\nhi\r\r\n", None, content.BARE_CR),
    (b"From: a@x\r\n\r\nh\0i\r\n", None, content.NUL),
    (b"", b"", None),
])
def test_line_endings_table(data, out, reply):
    got, refusal = content.line_endings(data)
    assert refusal == reply
    if reply is None:
        assert got == out
        assert got.count(b"\n") == got.count(b"\r\n") == got.count(b"\r")


@pytest.mark.parametrize("line, long", [(998, False), (999, True), (0, False), (5000, True)])
def test_long_line_table(line, long):
    data = b"From: a@x\r\n\r\n" + b"x" * line + b"\r\nend\r\n"
    assert content.long_line(data) is long
    assert content.long_line(b"x" * line) is long


ALICE = User(name="alice", hash="", senders=("@example.org", "ceo@example.com"))


@pytest.mark.parametrize("head, domains, user, reply", [
    (b"From: a@example.org\r\n", (), None, None),
    (b"From: Alice <a@example.org>\r\n", (), ALICE, None),
    (b"From: ceo@example.com\r\n", (), ALICE, None),
    (b"From: ceo@other.example\r\n", (), ALICE, content.FROM_NOT_ALLOWED),
    (b"From: a@example.org, ceo@other.example\r\n", (), ALICE, content.FROM_NOT_ALLOWED),
    (b"From: x@other.example\r\n", ("example.org",), None, content.FROM_NOT_ALLOWED),
    (b"From: x@mail.example.org\r\n", (".example.org",), None, None),
    (b"From: x@other.example\r\n", (), None, None),
    (b"From:\r\n =?utf-8?q?A?= <a@example.org>\r\n", ("example.org",), None, None),
    (b"Subject: no from\r\n", (), None, content.NO_FROM),
    (b"From: a@example.org\r\nFROM: b@example.org\r\n", (), None, content.TWO_FROM),
    (b"From: undisclosed:;\r\n", (), None, content.BAD_FROM),
    (b"From: not an address\r\n", (), None, content.BAD_FROM),
    (b"From: a@example.org\r\n" + b" (x)\r\n" * 2000, (), None, content.BAD_FROM),
])
def test_header_from_table(head, domains, user, reply):
    data = head + b"Subject: t\r\n\r\nbody\r\n"
    got, refusal = content.inspect(data, allowed_domains=domains, user=user)
    assert got == data
    if reply is content.FROM_NOT_ALLOWED:
        assert refusal is not None and refusal.line.startswith(reply.line)
    else:
        assert refusal == reply


def _line_events(func: Any, *args: Any) -> int:
    """Python line events spent in relay.ingress while func(*args) runs."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.endswith(("headers.py", "content.py")):
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        func(*args)
    finally:
        sys.settrace(None)
    return count


def _folded(lines: int) -> bytes:
    return (b"From: a@example.org\r\nSubject: folded\r\n" + b" more\r\n" * lines
            + b"To: b@example.net\r\n\r\nbody\r\n")


def test_header_work_does_not_grow_with_continuation_lines():
    def work(data: bytes) -> None:
        checked, refusal = content.inspect(data, allowed_domains=(), user=None)
        assert refusal is None
        headers.prepare(checked, received="Received: x", hostname="relay.test", now=0.0)

    small, large = _line_events(work, _folded(10)), _line_events(work, _folded(800_000))
    assert small == large < 400
