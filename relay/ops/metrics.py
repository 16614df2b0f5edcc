"""Prometheus metrics: what the relay did (counters) and what it holds (gauges at scrape).

Counters are fed by the delivery pool's Listener port (outcomes), by TimedSender (each
SendEmail call's latency and outcome), and by the SMTP sessions through their
SessionObserver hook (sessions, replies by code); spool depth and oldest age per state
are read from directory names when scraped. Feedback events by type and the suppression
list size are counted in the database (relay.store.db) at scrape time. Served at /metrics
by relay.ops.admin; wired by relay.service.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from relay.delivery.ports import Sender
from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from relay.spool.queue import STATES, arrival
from relay.spool.record import Record, SesOptions
from relay.spool.spool import Spool
from relay.store.db import Database, FeedbackEvent, Suppression

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DELAY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FEEDBACK_TYPES = ("bounce", "complaint", "delivery")


def call_outcome(exc: BaseException | None) -> str:
    """The label of one SendEmail call: ok, throttled, transient, permanent, ..."""
    if exc is None:
        return "ok"
    for cls, name in ((ThrottledError, "throttled"), (TransientError, "transient"),
                      (PermanentError, "permanent"), (ConfigurationError, "configuration"),
                      (AccountPausedError, "paused")):
        if isinstance(exc, cls):
            return name
    return "error"


class _SpoolCollector(Collector):
    """Depth and oldest age per state, from a directory scan (no file is read)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("relay_spool_messages", "Messages in the spool",
                                  labels=["state"])
        oldest = GaugeMetricFamily("relay_spool_oldest_age_seconds",
                                   "Age of the oldest message per state", labels=["state"])
        now = time.time()
        for state in STATES:
            n, first = 0, None
            try:
                for qid in self.spool.scan(state):
                    n += 1
                    if first is None or qid < first:
                        first = qid
            except FileNotFoundError:
                pass
            born = arrival(first) if first else None
            depth.add_metric([state.value], n)
            oldest.add_metric([state.value], max(0.0, now - born) if born else 0.0)
        yield depth
        yield oldest


class Metrics:
    def __init__(self, *, spool: Spool | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.smtp_sessions = Counter("relay_smtp_sessions", "SMTP connections opened",
                                     registry=r)
        self.smtp_replies = Counter("relay_smtp_replies", "SMTP replies sent, by code",
                                    ["code"], registry=r)
        self._reply_codes: dict[str, Counter] = {}
        self.accepted = Counter("relay_messages_accepted", "Messages spooled and answered 250",
                                registry=r)
        self.ses_calls = Counter("relay_ses_calls", "SendEmail calls by outcome", ["outcome"],
                                 registry=r)
        self.ses_latency = Histogram("relay_ses_call_seconds", "SendEmail call latency",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.recipients = Counter("relay_recipients", "Recipients by delivery outcome",
                                  ["outcome"], registry=r)
        self.recipients_sent = Counter("relay_recipients_sent",
                                       "Recipients accepted by SES", registry=r)
        self.suppressed = Counter("relay_suppressed_recipients",
                                  "Recipients dropped at delivery time as suppressed",
                                  registry=r)
        self.lane_queued = Counter("relay_lane_messages_queued",
                                   "Messages accepted into each lane", ["lane"], registry=r)
        self.lane_recipients = Counter("relay_lane_recipients",
                                       "Recipients by lane and delivery outcome",
                                       ["lane", "outcome"], registry=r)
        self.lane_delay = Histogram("relay_lane_queue_delay_seconds",
                                    "Time from the 250 reply to SES accepting the call, by lane",
                                    ["lane"], buckets=DELAY_BUCKETS, registry=r)
        for outcome in ("ok", "throttled", "transient", "permanent", "configuration", "paused"):
            self.ses_calls.labels(outcome)
        if spool is not None:
            r.register(_SpoolCollector(spool))

    # -- feeds ----------------------------------------------------------------------

    def session_opened(self) -> None:
        """relay.ingress.session.SessionObserver: a connection was accepted."""
        self.smtp_sessions.inc()

    def reply_sent(self, status: str | bytes) -> None:
        """relay.ingress.session.SessionObserver: one reply, counted by its code."""
        text = status.decode(errors="replace") if isinstance(status, bytes) else status
        code = text[:3]
        # every reply lands here: the labelled child is looked up once per code
        child = self._reply_codes.get(code)
        if child is None:
            if not code.isdigit():
                return
            child = self._reply_codes[code] = self.smtp_replies.labels(code)
        child.inc()

    async def outcome(self, kind: str, record: Record, recipients: Sequence[str], *,
                      ses_message_id: str = "", error: str = "") -> None:
        """The delivery pool's Listener port."""
        self.recipients.labels(kind).inc(len(recipients))
        lane = record.envelope.lane
        self.lane_recipients.labels(lane, kind).inc(len(recipients))
        if kind == "sent":
            self.recipients_sent.inc(len(recipients))
            self.lane_delay.labels(lane).observe(
                max(0.0, time.time() - record.envelope.received_at))
        elif kind == "suppressed":
            self.suppressed.inc(len(recipients))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Gauges:
    """What is read at scrape time, built once the parts it reads exist: feedback events
    by type and the suppression list size (one short query each), the feedback and guard
    numbers, the limiter's rate and whether delivery is paused."""

    def __init__(self, metrics: Metrics, *, db: Database,
                 stats: Callable[[], dict[str, float]], rate: Callable[[], float],
                 configured: Callable[[], float], paused: Callable[[], bool]) -> None:
        r = metrics.registry
        self.db = db
        self.stats = stats
        self.feedback_events = Gauge("relay_feedback_events",
                                     "SES feedback events recorded, by type", ["type"],
                                     registry=r)
        self.suppressions = Gauge("relay_suppressions", "Addresses on the suppression list",
                                  registry=r)
        self.extra = Gauge("relay_feedback_state", "Feedback ingester and reputation guard "
                           "numbers (messages by outcome, bounce and complaint rates)",
                           ["name"], registry=r)
        Gauge("relay_send_rate", "Current sending rate (recipients/s)",
              registry=r).set_function(rate)
        Gauge("relay_send_rate_configured", "Configured sending rate (recipients/s)",
              registry=r).set_function(configured)
        Gauge("relay_paused", "1 while delivery is paused",
              registry=r).set_function(lambda: 1.0 if paused() else 0.0)
        for kind in FEEDBACK_TYPES:
            self.feedback_events.labels(kind)

    async def refresh(self) -> None:
        """Before a scrape: the numbers that live in the database (one short query each)."""
        for name, val in self.stats().items():
            self.extra.labels(name).set(val)
        async with self.db.engine.connect() as conn:
            total = await conn.execute(select(func.count()).select_from(Suppression))
            self.suppressions.set(total.scalar_one())
            rows = await conn.execute(
                select(FeedbackEvent.kind, func.count()).group_by(FeedbackEvent.kind))
            for kind, n in rows.all():
                self.feedback_events.labels(kind).set(n)


class TimedSender:
    """A Sender that times each SendEmail call and counts it by outcome."""

    def __init__(self, inner: Sender, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def send_raw(self, *, sender: str, recipients: Sequence[str], raw: bytes,
                       options: SesOptions | None = None) -> str:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await self.inner.send_raw(sender=sender, recipients=recipients, raw=raw,
                                             options=options)
        except DeliveryError as exc:
            error = exc
            raise
        finally:
            self.metrics.ses_latency.observe(time.perf_counter() - start)
            self.metrics.ses_calls.labels(call_outcome(error)).inc()
