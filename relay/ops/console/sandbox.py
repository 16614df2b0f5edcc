"""The sandbox mail pages: what the embedded SES "sent" (its outbox of .eml files named by
SES MessageId), newest first, each with the simulator feedback it produced; one message's
headers and text part, and its HTML part only inside a sandboxed iframe whose source
(/sandbox/ID/html) is served under SANDBOX_CSP. Reads the outbox directory
(ses.endpoint_url = "sandbox"); called by relay.ops.console.app.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from relay.ops.console.html import Markup, h, join, table, url, when
from relay.ops.console.views_log import EVENT_NAMES
from relay.store.lookup import Event

#: the sandbox's SES MessageIds (relay.sandbox.server._message_id)
_ID = re.compile(r"[0-9a-f]{16}-[0-9a-f-]{36}-\d{6}")
PAGE = 100
NOT_SANDBOX = ("The sandbox mail page shows what the embedded SES sandbox sent; this relay "
               'sends through SES (ses.endpoint_url is not "sandbox"), so there is none.')


def valid_id(mid: str) -> bool:
    return bool(_ID.fullmatch(mid))


@dataclass(frozen=True)
class Sent:
    id: str
    at: float
    sender: str
    to: str
    subject: str


def _head(path: Path) -> EmailMessage:
    with open(path, "rb") as fh:
        msg = BytesParser(policy=policy.default).parse(fh, headersonly=True)
    assert isinstance(msg, EmailMessage)
    return msg


def listing(outbox: Path, *, before: str = "", limit: int = PAGE) -> tuple[list[Sent], str]:
    """A page of the outbox, newest first (ids sort by time), and the id to go on before."""
    try:
        with os.scandir(outbox) as it:
            names = [e.name[:-4] for e in it if e.name.endswith(".eml")
                     and not e.name.startswith(".")]
    except FileNotFoundError:
        return [], ""
    names = sorted((n for n in names if not before or n < before), reverse=True)
    out = []
    for mid in names[:limit]:
        path = outbox / f"{mid}.eml"
        try:
            head = _head(path)
            at = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        out.append(Sent(mid, at, str(head.get("From", "")),
                        ", ".join(str(head.get(k, "")) for k in ("To", "Cc") if head.get(k)),
                        str(head.get("Subject", ""))))
    return out, names[limit - 1] if len(names) > limit else ""


@dataclass(frozen=True)
class Shown:
    id: str
    headers: str
    text: str
    html: str | None


def read(outbox: Path, mid: str) -> Shown | None:
    """One sent message's headers, text part and HTML part; None when there is none."""
    if not valid_id(mid):
        return None
    try:
        raw = (outbox / f"{mid}.eml").read_bytes()
    except OSError:
        return None
    end = raw.find(b"\r\n\r\n")
    end = raw.find(b"\n\n") if end < 0 else end
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    text = html = None
    try:
        part = msg.get_body(("plain",))
        text = part.get_content() if part is not None else None
        part = msg.get_body(("html",))
        html = part.get_content() if part is not None else None
    except (LookupError, ValueError, AttributeError):
        pass  # an odd charset or structure: the headers and raw download still show it
    return Shown(mid, raw[: end if end >= 0 else len(raw)].decode("utf-8", "replace"),
                 text or "", html)


def _feedback(events: Sequence[Event]) -> Markup:
    if not events:
        return Markup('<span class="note">none</span>')
    return join((h('<span class="fb fb-{k}">{k} {r}</span>', k=EVENT_NAMES.get(e.kind, e.kind),
                   r=e.recipient) for e in events), " ")


def outbox_page(items: Sequence[Sent], feedback: Mapping[str, Sequence[Event]],
                next_before: str) -> Markup:
    rows = [h('<tr data-id="{i}"><td><a href="/sandbox/{i}">{s}</a></td><td>{f}</td><td>{t}'
              '</td><td>{w}</td><td>{fb}</td></tr>', i=m.id, s=m.subject or "(no subject)",
              f=m.sender, t=m.to, w=when(m.at), fb=_feedback(feedback.get(m.id, ())))
            for m in items]
    nxt = h('<p class="paging"><a id="next-page" href="{}">older →</a></p>',
            url("/sandbox", before=next_before)) if next_before else Markup("")
    return h('<p class="note">Mail the embedded SES sandbox accepted, as SES would have sent '
             'it. Mailbox-simulator addresses (success@, bounce@, complaint@, ooto@, '
             'suppressionlist@simulator.amazonses.com) produce real feedback events.</p>{}{}',
             table("sandbox-mail", ("subject", "from", "to", "when", "simulator feedback"),
                   rows, empty="Nothing sent yet: send a message to the relay's SMTP port."),
             nxt)


def message_page(shown: Shown, events: Sequence[Event]) -> Markup:
    frame = h('<iframe id="html-part" sandbox src="/sandbox/{}/html" title="HTML part" '
              'referrerpolicy="no-referrer"></iframe>', shown.id
              ) if shown.html is not None else Markup('<p class="note">No HTML part.</p>')
    return h('<p>SES MessageId <code>{i}</code> · feedback: {fb} · '
             '<a href="/log?q={i}">in the log</a></p><h2>Headers</h2><pre id="headers">{hd}'
             '</pre><h2>Text</h2><pre id="text-part">{tx}</pre><h2>HTML</h2>{fr}',
             i=shown.id, fb=_feedback(events), hd=shown.headers, tx=shown.text or "(none)",
             fr=frame)
