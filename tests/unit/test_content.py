"""relay.ingress.content: line endings, long lines and the header From, by tables; and the
header split's work measured in Python line events, which must not grow with the number
of continuation lines of a folded field."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("data", [
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n",
    b"From: a@example.org\nBcc: c@example.net\nX-SES-CONFIGURATION-SET: cs\n\nbody\n",
    b"X-SES-MESSAGE-TAGS: a=b\r\nFrom: a@example.org\r\nDate: x\r\nMessage-ID: <m@x>\r\n"
    b"X-Ses-Tenant-Name: t\r\n\r\nbody\r\n",
    b"From: a@example.org\r\nSubject: folded\r\n more\r\n\tstill\r\n",
    b"From: a@example.org",
])
def test_one_header_split_gives_what_splitting_at_each_step_gives(data):
    """The ingress splits the header once (content.check) and hands the split to the lane
    facts, the X-SES-* strip and prepare(): the same facts and bytes as splitting anew."""
    from relay.ingress import lanes

    checked, parts, refusal = content.check(data, allowed_domains=(), user=None)
    assert refusal is None and parts is not None
    assert lanes.header_fields(checked, parts) == lanes.header_fields(checked)
    stripped = lanes.strip(checked, parts)
    assert stripped == lanes.strip(checked)
    again = parts if stripped is checked else None
    kw: dict[str, Any] = {"received": "Received: x", "hostname": "relay.test", "now": 0.0}

    def made(out: bytes) -> bytes:  # the Message-ID the relay adds is random
        return re.sub(rb"Message-ID: <0\.[0-9a-f]+@relay\.test>", b"Message-ID: <?>", out)

    assert made(headers.prepare(stripped, parts=again, **kw)) == made(
        headers.prepare(lanes.strip(checked), **kw))


def test_the_preparer_uses_a_known_split_only_for_the_message_it_belongs_to(tmp_path):
    """IngressHandler.preparer is given the checked message and its split; bytes that are
    not that message (a caller's other bytes) are split anew, never cut by another's."""
    from types import SimpleNamespace

    from aiosmtpd.smtp import Session

    from relay.config import SmtpConfig
    from relay.ingress.server import IngressHandler
    from relay.spool.spool import Spool

    handler = IngressHandler(spool=Spool(tmp_path / "spool", fsync=False),
                             config=SmtpConfig(hostname="relay.test"))
    one, parts, _ = content.check(
        b"From: a@example.org\r\nBcc: x@example.net\r\nX-SES-CONFIGURATION-SET: cs\r\n\r\n"
        b"body\r\n", allowed_domains=(), user=None)
    other = b"From: b@example.org\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\nother\r\n"
    session = Session(None)  # type: ignore[arg-type] # no loop needed to name the client
    prepare = handler.preparer(SimpleNamespace(transport=None), session,  # type: ignore[arg-type]
                               (one, parts))
    out = prepare(other)
    assert out.endswith(b"From: b@example.org\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\nother\r\n")
    mine = prepare(one)
    assert b"Bcc" not in mine and b"X-SES" not in mine and mine.endswith(b"\r\n\r\nbody\r\n")
