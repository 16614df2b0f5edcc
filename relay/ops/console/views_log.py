"""The log and suppression pages: GET /log (search by address, Message-ID, SES MessageId
or queue id), GET /log/QID (a message's timeline), GET /suppressions (search, add, remove,
import, export). Pure: plain values in, Markup out; called by relay.ops.console.app.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.ops.console.html import Markup, h, hidden_csrf, join, table, url, when
from relay.store.lookup import Event, Row, Suppressed
from relay.store.suppression import REASONS

#: feedback kind -> the timeline's event name
EVENT_NAMES = {"delivery": "delivered", "bounce": "bounced", "complaint": "complained",
               "soft-bounce": "soft-bounced", "reject": "rejected", "delay": "delayed",
               "send": "send", "rendering-failure": "rendering-failure"}


def log(q: str, rows: Sequence[Row]) -> Markup:
    form = h('<form method="get" action="/log" class="filters"><label>address, Message-ID, '
             'SES MessageId or queue id <input name="q" value="{}" size="50" autofocus>'
             '</label><button type="submit">Search</button></form>', q)
    body = [h('<tr class="log-row" data-qid="{q}"><td>{upd}</td><td><a href="/log/{q}">{q}'
              '</a></td><td>{r}</td><td class="status-{s}">{s}</td><td>{n}</td>'
              '<td class="ses-id">{sid}</td><td>{mid}</td><td class="error">{err}</td></tr>',
              upd=when(r.updated_at), q=r.queue_id, r=r.recipient, s=r.status, n=r.attempts,
              sid=r.ses_message_id, mid=r.message_id_header, err=r.last_error)
            for r in rows]
    hint = Markup("") if q else Markup('<p class="note">Search the message log.</p>')
    return join([form, hint, table("log", ("updated", "queue id", "recipient", "status",
                                           "attempts", "SES MessageId", "Message-ID",
                                           "last error"), body,
                                   empty="Nothing in the log matches." if q else "")])


@dataclass(frozen=True)
class Step:
    at: float
    event: str
    recipient: str
    detail: str


def timeline_steps(rows: Sequence[Row], events: Sequence[Event]) -> list[Step]:
    """A message's life in order: queued, attempts, sent, then each SES event, and the
    final outcomes the log recorded (pure; tested)."""
    steps: list[tuple[int, Step]] = []
    for r in rows:
        steps.append((0, Step(r.created_at, "queued", r.recipient,
                              f"Message-ID {r.message_id_header}" if r.message_id_header
                              else "")))
        if r.attempts:
            # once sent, last_error holds what SES reported later (a bounce): not an attempt's
            error = r.last_error if r.last_error and not r.sent_at else ""
            steps.append((1, Step(r.sent_at or r.updated_at, "attempt", r.recipient,
                                  f"{r.attempts} attempt(s)"
                                  + (f"; last error: {error}" if error else ""))))
        if r.sent_at:
            steps.append((2, Step(r.sent_at, "sent", r.recipient,
                                  f"SES MessageId {r.ses_message_id}")))
        if r.status in ("suppressed", "failed", "deferred"):
            steps.append((2, Step(r.updated_at, r.status, r.recipient, r.last_error)))
    # SES's clock stamps its events: one may read a little before the relay saw the answer
    steps += [(3, Step(e.occurred_at, EVENT_NAMES.get(e.kind, e.kind), e.recipient, e.detail))
              for e in events]
    return [s for _, s in sorted(steps, key=lambda rs: (rs[0], rs[1].at))]


def timeline(qid: str, rows: Sequence[Row], events: Sequence[Event]) -> Markup:
    steps = timeline_steps(rows, events)
    items = join(h('<li data-event="{e}"><time>{t}</time> <strong>{e}</strong> {r} '
                   '<span class="detail">{d}</span></li>', e=s.event, t=when(s.at),
                   r=s.recipient, d=s.detail) for s in steps)
    if not steps:
        items = Markup('<li class="empty">Nothing in the log for this queue id.</li>')
    return h('<p><a href="/queue/{q}">the message in the queue</a> (if it is still there)</p>'
             '<ol id="timeline">{}</ol>', items, q=qid)


def suppressions(q: str, entries: Sequence[Suppressed], *, csrf: str, read_only: bool,
                 next_after: str) -> Markup:
    dis = Markup(" disabled") if read_only else Markup("")
    reasons = join(h('<option value="{}">{}</option>', r, r) for r in REASONS)
    rows = []
    for s in entries:
        e, cause = s.entry, s.cause
        caused = h('<a href="{}">{} {}</a> {}', url("/log", q=cause.ses_message_id or e.address),
                   cause.kind, when(cause.occurred_at), cause.detail) if cause else e.detail
        rows.append(h('<tr data-address="{a}"><td>{a}</td><td>{r}</td><td>{s}</td><td>{w}</td>'
                      '<td>{c}</td><td><form method="post" action="/suppressions/remove">{t}'
                      '<input type="hidden" name="address" value="{a}"><button type="submit"'
                      '{d}>remove</button></form></td></tr>', a=e.address, r=e.reason,
                      s=e.source, w=when(e.created_at), c=caused, t=hidden_csrf(csrf), d=dis))
    nxt = h('<p class="paging"><a id="next-page" href="{}">next page →</a></p>',
            url("/suppressions", q=q, after=next_after)) if next_after else Markup("")
    return h('<form method="get" action="/suppressions" class="filters"><label>address '
             'contains <input name="q" value="{q}"></label><button type="submit">Search'
             '</button> <a href="/suppressions.csv">export CSV</a></form>{tab}{nxt}'
             '<h2>Add</h2><form method="post" action="/suppressions/add" class="add">{t}'
             '<label>address <input name="address" required></label><label>reason '
             '<select name="reason">{reasons}</select></label><button type="submit"{d}>add'
             '</button></form><h2>Import</h2><form method="post" action="/suppressions/import"'
             ' enctype="multipart/form-data" class="import">{t}<input type="file" name="csv" '
             'accept=".csv,text/csv" required><button type="submit"{d}>import CSV</button>'
             '<span class="note">a header naming address (and reason, detail), or one '
             'address a line</span></form>',
             q=q, tab=table("suppressions", ("address", "reason", "source", "when",
                                             "the event that caused it", ""), rows,
                            empty="No suppressed address matches."),
             nxt=nxt, t=hidden_csrf(csrf), reasons=reasons, d=dis)
