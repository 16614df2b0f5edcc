"""The queue pages: GET /queue (filters, a page of messages, actions on a selection) and
GET /queue/QID (envelope, per-recipient results, attempts, headers, actions). Pure: plain
values in, Markup out; called by relay.ops.console.app.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.ops.console.data import VERBS, Filter, QueuePage
from relay.ops.console.html import Markup, ago, h, hidden_csrf, join, table, url, when
from relay.spool.queue import STATES

#: which verbs a message page offers in each state (the ones that apply there)
OFFERED = {"active": ("hold", "delete"), "deferred": ("retry", "hold", "requeue", "delete"),
           "hold": ("release", "requeue", "delete"), "failed": ("requeue", "delete"),
           "corrupt": ("delete",)}


def _option(value: str, current: str) -> Markup:
    return h('<option value="{}"{}>{}</option>', value,
             Markup(" selected") if value == current else "", value or "any state")


def filters(f: Filter, lanes: Sequence[str], min_age: str) -> Markup:
    states = join(_option(s, f.state) for s in ("", *(s.value for s in STATES)))
    lane_opts = join(h('<option value="{}"{}>{}</option>', ln,
                       Markup(" selected") if ln == f.lane else "", ln or "any lane")
                     for ln in ("", *lanes))
    return h(
        '<form method="get" action="/queue" class="filters">'
        '<label>state <select name="state">{}</select></label>'
        '<label>lane <select name="lane">{}</select></label>'
        '<label>sender <input name="sender" value="{}" placeholder="address or @domain">'
        '</label><label>recipient domain <input name="domain" value="{}"></label>'
        '<label>older than <input name="min_age" value="{}" placeholder="10m"></label>'
        '<label>last error <input name="error" value="{}"></label>'
        '<button type="submit">Filter</button></form>',
        states, lane_opts, f.sender, f.domain, min_age, f.error)


def _row(doc: dict[str, Any], now: float) -> Markup:
    qid = doc["id"]
    nxt = doc.get("next_attempt")
    return h('<tr data-qid="{q}" data-state="{s}"><td><input type="checkbox" name="qid" '
             'value="{q}" form="selection"></td><td><a class="qid" href="/queue/{q}">{q}</a>'
             '</td><td>{s}</td><td>{age}</td><td>{lane}</td><td>{sender}</td><td>{rcpt}</td>'
             '<td>{tries}</td><td>{nxt}</td><td class="error">{err}</td></tr>',
             q=qid, s=doc["state"], age=ago(doc.get("age")), lane=doc.get("lane", "-"),
             sender=doc.get("sender") or "<>",
             rcpt=f"{doc.get('pending', 0)}/{doc.get('recipients', 0)}",
             tries=doc.get("attempts", 0), nxt=f"in {ago(nxt - now)}" if nxt else "-",
             err=doc.get("last_error") or doc.get("error") or "")


def queue(page: QueuePage, f: Filter, *, csrf: str, lanes: Sequence[str], min_age: str,
          now: float, read_only: bool) -> Markup:
    rows = [_row(d, now) for d in page.rows]
    buttons = join(h('<button type="submit" name="action" value="{}"{}>{}</button>', v,
                     Markup(" disabled") if read_only else "", v) for v in VERBS)
    nxt = h('<a id="next-page" href="{}">next page →</a>',
            url("/queue", state=f.state, lane=f.lane, sender=f.sender, domain=f.domain,
                min_age=min_age, error=f.error, after=page.next_after)
            ) if page.next_after else Markup("")
    here = url("/queue", state=f.state, lane=f.lane, sender=f.sender, domain=f.domain,
               min_age=min_age, error=f.error, after=f.after)
    return h('{}<form id="selection" method="post" action="/queue/actions">{}'
             '<input type="hidden" name="back" value="{}">'
             '<p class="actions">With the selected messages: {}</p></form>{}'
             '<p class="paging">{} shown{}. {}</p>',
             filters(f, lanes, min_age), hidden_csrf(csrf), here, buttons,
             table("queue", ("", "queue id", "state", "age", "lane", "sender",
                             "pending/rcpt", "attempts", "next", "last error"), rows,
                   empty="No message matches."),
             len(rows), h(" (after {})", f.after) if f.after else "", nxt)


def action_forms(qid: str, state: str, csrf: str, read_only: bool) -> Markup:
    return join(h('<form method="post" action="/queue/{q}/{v}" class="action-{v}">{c}'
                  '<button type="submit"{d}>{v}</button></form>',
                  q=qid, v=v, c=hidden_csrf(csrf), d=Markup(" disabled") if read_only else "")
                for v in OFFERED.get(state, ()))


def recipients(doc: dict[str, Any]) -> Markup:
    env = doc.get("envelope", {})
    results = doc.get("results", {})
    rows = []
    for rcpt in env.get("recipients", []):
        res = results.get(rcpt) or {}
        rows.append(h('<tr data-recipient="{r}"><td><a href="{lg}">{r}</a></td><td>{st}</td>'
                      '<td class="ses-id">{sid}</td><td>{at}</td><td>{why}</td></tr>',
                      r=rcpt, lg=url("/log", q=rcpt), st=res.get("status", "pending"),
                      sid=res.get("ses_message_id", ""), at=when(res.get("at")),
                      why=res.get("reason", "")))
    return table("recipients", ("recipient", "result", "SES MessageId", "when", "reason"),
                 rows, empty="No recipients readable.")


def message(doc: dict[str, Any], *, csrf: str, now: float, read_only: bool) -> Markup:
    qid, state = doc["id"], doc["state"]
    env = doc.get("envelope", {})
    nxt = doc.get("next_attempt")
    facts = [("queue id", qid), ("state", state), ("age", ago(doc.get("age"))),
             ("size", f"{doc.get('size', 0)} bytes"), ("sender", env.get("sender") or "<>"),
             ("lane", env.get("lane", "")), ("client", env.get("client", "")),
             ("helo", env.get("helo", "")), ("received", when(env.get("received_at"))),
             ("attempts", doc.get("attempts", 0)),
             ("next attempt", f"{when(nxt)} (in {ago(nxt - now)})" if nxt else "-"),
             ("last error", doc.get("last_error") or doc.get("error") or "-")]
    facts += [(f"ses {k}", ", ".join(f"{n}={v}" for n, v in val) if k == "tags" else val)
              for k, val in env.get("ses", {}).items()]
    dl = join(h('<dt>{}</dt><dd id="{}">{}</dd>', k, k.replace(" ", "-"), v) for k, v in facts)
    return h('<dl class="facts">{}</dl><div class="actions">{}</div>'
             '<h2>Recipients</h2>{}<p><a href="/log/{q}">timeline in the log</a> · '
             '<a id="raw" href="/queue/{q}/raw" download="{q}.eml">raw message (.eml)</a></p>'
             '<h2>Headers</h2><pre id="headers">{}</pre>',
             dl, action_forms(qid, state, csrf, read_only), recipients(doc),
             doc.get("raw_headers", ""), q=qid)
