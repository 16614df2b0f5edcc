"""The overview page (GET /): counts by state and lane, the oldest message, send rate
against the account's (an inline SVG drawn here), the 24-hour quota, bounce and complaint
rates against the guard's and SES's lines, pause, feedback lag, readiness. Pure: plain
values in, Markup out; called by relay.ops.console.app.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.ops.console.data import COUNTED, WAITING, Counts
from relay.ops.console.html import Markup, ago, h, join, pct, url, when
from relay.ops.console.sources import (
    SES_PAUSE_BOUNCE,
    SES_PAUSE_COMPLAINT,
    SES_REVIEW_BOUNCE,
    SES_REVIEW_COMPLAINT,
    Line,
    Status,
)
from relay.store.lookup import Event

W, H, PAD = 600, 160, 30


def rate_chart(per_minute: Sequence[int], account_rate: float) -> Markup:
    """Recipients sent per second, minute by minute over the last hour, as bars, with the
    account's rate as a dashed line."""
    rates = [n / 60 for n in per_minute]
    top = max([account_rate, *rates, 0.1]) * 1.1
    n = max(1, len(rates))
    bw = (W - PAD) / n

    def y(v: float) -> float:
        return round(H - PAD + -(H - 2 * PAD) * v / top + 0.0, 1)

    bars = join(h('<rect x="{}" y="{}" width="{}" height="{}" class="bar"><title>{} min ago: '
                  '{} recipients/s</title></rect>',
                  round(PAD + i * bw, 1), y(r), round(max(bw - 1, 1), 1),
                  round(H - PAD - y(r), 1), n - i, f"{r:.2f}")
                for i, r in enumerate(rates))
    line = h('<line x1="{}" x2="{}" y1="{}" y2="{}" class="limit"/>'
             '<text x="{}" y="{}" class="label">account {} /s</text>',
             PAD, W, y(account_rate), y(account_rate), W - 4, y(account_rate) - 4,
             f"{account_rate:g}") if account_rate else Markup("")
    last = rates[-1] if rates else 0.0
    if per_minute:
        caption = h('<p class="note" id="send-rate-caption">{} recipient(s) sent in the last '
                    'hour, {} in the last minute; the account allows {} per second.</p>',
                    sum(per_minute), per_minute[-1], f"{account_rate:g}")
    else:
        caption = Markup('<p class="note error" id="send-rate-caption">The message log did '
                         'not answer: no send rate to show.</p>')
    svg = h('<svg id="send-rate" role="img" viewBox="0 0 {w} {hh}" width="{w}" height="{hh}" '
             'xmlns="http://www.w3.org/2000/svg" aria-label="send rate over the last hour">'
             '<title>recipients per second, last 60 minutes; now {now} /s</title>'
             '<line x1="{p}" x2="{w}" y1="{b}" y2="{b}" class="axis"/>{bars}{line}'
             '<text x="{p}" y="{lb}" class="label">60 min ago</text>'
             '<text x="{w}" y="{lb}" class="label end">now</text>'
             '<text x="2" y="{tt}" class="label">{top}</text></svg>',
             w=W, hh=H, now=f"{last:.2f}", p=PAD, b=H - PAD, bars=bars, line=line,
             lb=H - PAD + 16, tt=PAD, top=f"{top:.1f}")
    return join([svg, caption])


def state_table(c: Counts, lanes: Sequence[str]) -> Markup:
    lane_names = list(dict.fromkeys([*lanes, *c.lanes]))
    head = join([Markup("<th>state</th><th>messages</th>"),
                 *(h('<th data-lane="{}">{}</th>', ln, ln) for ln in lane_names)])
    rows = []
    for state in COUNTED:
        cells = join(
            h('<td data-lane="{}">{}{}</td>', ln,
              "~" if c.lanes_estimated and state in WAITING else "",
              c.lanes.get(ln, {}).get(state.value, 0)) if state in WAITING
            else h('<td data-lane="{}">-</td>', ln) for ln in lane_names)
        rows.append(h('<tr data-state="{s}"><th><a href="{u}">{s}</a></th>'
                      '<td class="count">{n}</td>{cells}</tr>',
                      s=state.value, u=url("/queue", state=state.value)
                      if state is not state.INCOMING else "/queue",
                      n=c.states.get(state.value, 0), cells=cells))
    note = Markup('<p class="note">~ lane counts estimated from a sample of envelopes</p>'
                  ) if c.lanes_estimated else Markup("")
    return h('<table id="state-counts"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>{}',
             head, join(rows), note)


def _rate_cell(rate: float, guard: float, review: float, stop: float, judged: bool) -> Markup:
    cls = "note" if not judged else "bad" if rate >= review else "warn" if rate > guard else "ok"
    return h('<td class="{}">{}</td><td>{}</td><td>{} / {}</td>', cls, pct(rate), pct(guard),
             pct(review), pct(stop))


def reputation(lines: Sequence[Line]) -> Markup:
    rows = join(h('<tr data-lane="{lane}"><th>{name}</th><td>{sent}</td>{b}{c}<td>{p}</td></tr>',
                  lane=ln.lane or "account", name=ln.lane or "account", sent=ln.sent,
                  b=_rate_cell(ln.bounce_rate, ln.max_bounce_rate, SES_REVIEW_BOUNCE,
                               SES_PAUSE_BOUNCE, ln.sent >= ln.min_sample),
                  c=_rate_cell(ln.complaint_rate, ln.max_complaint_rate,
                               SES_REVIEW_COMPLAINT, SES_PAUSE_COMPLAINT,
                               ln.sent >= ln.min_sample),
                  p=ln.paused or "; ".join(x for x in (
                      f"too few sends to judge (under {ln.min_sample})"
                      if ln.sent < ln.min_sample else "",
                      f"{ln.unknown} send(s) awaiting their outcome" if ln.unknown else "") if x))
                for ln in lines)
    return h('<section id="reputation"><h2>Reputation</h2><table><thead><tr><th></th>'
             '<th>sent</th><th>bounce rate</th><th>guard line</th><th>SES review / pause</th>'
             '<th>complaint rate</th><th>guard line</th><th>SES review / pause</th>'
             '<th></th></tr></thead><tbody>{}</tbody></table></section>', rows)


def quota(status: Status) -> Markup:
    acct = status.account
    if acct is None:
        return Markup('<p id="quota">24-hour quota: not read from SES yet</p>')
    if acct.max_24hour_send < 0:
        return h('<p id="quota">24-hour quota: unlimited ({} sent, as SES last said)</p>',
                 f"{acct.sent_last_24hours:g}")
    used = acct.sent_last_24hours / acct.max_24hour_send if acct.max_24hour_send else 1.0
    return h('<p id="quota">24-hour quota: {} of {} used ({}) '
             '<meter min="0" max="1" value="{}">{}</meter> <span class="note">as SES '
             'last said (GetAccount)</span></p>',
             f"{acct.sent_last_24hours:g}", f"{acct.max_24hour_send:g}", pct(used),
             f"{min(used, 1.0):.4f}", pct(used))


def paused(status: Status) -> Markup:
    reasons = [r for r in (status.paused_reason if status.paused else "", *status.holds) if r]
    if not reasons:
        return Markup('<p id="paused" class="ok">Delivery is running.</p>')
    return h('<div id="paused" class="bad"><p>Delivery is paused:</p><ul>{}</ul></div>',
             join(h("<li>{}</li>", r) for r in reasons))


def feedback_lag(latest: Event | None, now: float) -> Markup:
    if latest is None:
        return Markup('<p id="feedback-lag">Feedback: no SES event received yet.</p>')
    return h('<p id="feedback-lag">Feedback: last event received {} ago ({} {}); it reached '
             'the relay {} after SES reported it.</p>',
             ago(now - latest.received_at), latest.kind, when(latest.occurred_at),
             ago(latest.received_at - latest.occurred_at))


def readiness(problems: Sequence[str]) -> Markup:
    deps = ("spool", "database", "ses", "delivery")
    rows = []
    for dep in deps:
        mine = [p for p in problems if p.lower().startswith(dep)
                or (dep == "delivery" and p.lower().startswith(("delivery", "results")))]
        rows.append(h('<tr data-dep="{}"><th>{}</th><td class="{}">{}</td></tr>', dep, dep,
                      "bad" if mine else "ok", "; ".join(mine) or "ready"))
    other = [p for p in problems if not p.lower().startswith(deps)]
    rows += [h('<tr data-dep="other"><th>relay</th><td class="bad">{}</td></tr>', p)
             for p in other]
    return h('<section id="readiness"><h2>Readiness</h2><table>{}</table></section>', join(rows))


def overview(*, counts: Counts, status: Status, per_minute: Sequence[int],
             problems: Sequence[str], latest: Event | None, now: float) -> Markup:
    oldest = h('<p id="oldest">Oldest message waiting: <a href="{}">{}</a>, {} old.</p>',
               f"/queue/{counts.oldest_id}", counts.oldest_id, ago(counts.oldest_age)
               ) if counts.oldest_id else Markup('<p id="oldest">No message waiting.</p>')
    acct_rate = status.configured_rate or (status.account.max_send_rate
                                           if status.account else 0.0)
    return h('<section id="queue-state"><h2>Queue</h2>{}{}</section>'
             '<section id="sending"><h2>Sending</h2>{}{}{}</section>{}{}{}',
             state_table(counts, status.lanes), oldest, paused(status),
             rate_chart(per_minute, acct_rate), quota(status), reputation(status.reputation),
             feedback_lag(latest, now), readiness(problems))
