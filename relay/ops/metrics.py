"""Prometheus metrics: what the relay did (counters) and what it holds (gauges at scrape).

Counters are fed by the delivery pool's Listener port (outcomes), by TimedSender (each
SendEmail call's latency and outcome), and by the SMTP sessions through their
SessionObserver hook (sessions, replies by code: plain counts, moved into the counters at
each scrape and every second); every known label value is exposed from the start.
Scrape-time families (spool, feedback, reputation, process_*) come from
relay.ops.metrics_scrape. With several workers, counters live in the shared
PROMETHEUS_MULTIPROC_DIR and worker 0's /metrics sums them. Wired by relay.service.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
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
from relay.ops.metrics_scrape import SpoolCollector, WorkersProcessCollector, feedback_families
from relay.spool.record import Record, SesOptions
from relay.spool.spool import Spool
from relay.store.db import Database, FeedbackEvent, Suppression

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: set by relay.ops.workers for its workers: counters shared through files there
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DELAY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FEEDBACK_TYPES = ("bounce", "complaint", "delivery")
CALL_OUTCOMES = ("ok", "throttled", "transient", "permanent", "configuration", "paused",
                 "error")
#: relay.delivery.ports.Listener kinds
RECIPIENT_OUTCOMES = ("sent", "suppressed", "rejected", "deferred", "throttled", "held",
                      "failed", "expired")
#: the reply codes the relay's SMTP service sends (others are counted when seen)
REPLY_CODES = ("220", "221", "235", "250", "334", "354", "421", "451", "452", "454", "500",
               "501", "502", "503", "504", "530", "535", "550", "552", "553", "554", "555")
#: seconds between updates of the per-worker gauges in the shared directory
LIVE_INTERVAL = 1.0


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


class _Scraped(Collector):
    """Families computed by a callable at each scrape (set once the parts exist)."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source()


class Metrics:
    def __init__(self, *, spool: Spool | None = None, lanes: Sequence[str] = ()) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        #: the directory the workers share counters through; None with one process
        self.shared = Path(directory) if directory else None
        #: counters and histograms (in the shared directory too when there is one)
        self.registry = r = CollectorRegistry()
        #: what this process computes when it serves /metrics
        self.local = CollectorRegistry()
        self.scraped = _Scraped()
        self.local.register(self.scraped)
        if self.shared is None:
            ProcessCollector(registry=self.local)
        else:
            self.local.register(WorkersProcessCollector(self.shared))
        if spool is not None:
            self.local.register(SpoolCollector(spool))
        self.smtp_sessions = Counter("relay_smtp_sessions", "SMTP connections opened",
                                     registry=r)
        self.smtp_replies = Counter("relay_smtp_replies", "SMTP replies sent, by code",
                                    ["code"], registry=r)
        self._reply_codes: dict[str, Counter] = {
            code: self.smtp_replies.labels(code) for code in REPLY_CODES}
        #: sessions and replies by code not yet in the counters above (see flush())
        self._opened = 0
        self._replies: dict[str | bytes, int] = {}
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
        for outcome in CALL_OUTCOMES:
            self.ses_calls.labels(outcome)
        for kind in RECIPIENT_OUTCOMES:
            self.recipients.labels(kind)
        for lane in lanes:
            self.lane_queued.labels(lane)
            self.lane_delay.labels(lane)
            for kind in RECIPIENT_OUTCOMES:
                self.lane_recipients.labels(lane, kind)

    # -- feeds ----------------------------------------------------------------------

    def session_opened(self) -> None:
        """relay.ingress.session.SessionObserver: a connection was accepted."""
        self._opened += 1

    def reply_sent(self, status: str | bytes) -> None:
        """relay.ingress.session.SessionObserver: one reply, counted by its code.

        Every reply lands here, so it only adds one to a plain count; flush() hands the
        counts to the Prometheus counters (whose increments take a lock and, with several
        workers, write a shared file) at each scrape and every LIVE_INTERVAL.
        """
        code = status[:3]
        self._replies[code] = self._replies.get(code, 0) + 1

    def flush(self) -> None:
        """Move the plain session and reply counts into the Prometheus counters."""
        if self._opened:
            opened, self._opened = self._opened, 0
            self.smtp_sessions.inc(opened)
        if not self._replies:
            return
        replies, self._replies = self._replies, {}
        for raw, n in replies.items():
            code = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            child = self._reply_codes.get(code)
            if child is None:
                if not code.isdigit():
                    continue
                child = self._reply_codes[code] = self.smtp_replies.labels(code)
            child.inc(n)

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
        self.flush()
        if self.shared is None:
            return generate_latest(self.registry) + generate_latest(self.local)
        every = CollectorRegistry()
        MultiProcessCollector(every, path=str(self.shared))  # type: ignore[no-untyped-call]
        return generate_latest(every) + generate_latest(self.local)


class Gauges:
    """What is read at scrape time, built once the parts it reads exist: feedback events
    by type and the suppression list size (one short query each), the feedback and guard
    numbers, the limiter's rate and whether delivery is paused."""

    def __init__(self, metrics: Metrics, *, db: Database,
                 stats: Callable[[], dict[str, float]], rate: Callable[[], float],
                 configured: Callable[[], float], paused: Callable[[], bool]) -> None:
        self.db = db
        self.stats = stats
        self.events: dict[str, int] = dict.fromkeys(FEEDBACK_TYPES, 0)
        self.suppressions = 0
        metrics.scraped.sources.append(self.families)
        # per worker: each worker's share of the rate, summed; paused if any worker is
        live = ((Gauge("relay_send_rate_recipients_per_second",
                       "Current sending rate of the rate limiter",
                       registry=metrics.registry, multiprocess_mode="livesum"), rate),
                (Gauge("relay_configured_send_rate_recipients_per_second",
                       "Configured sending rate (the lower of delivery.max_rate and SES's)",
                       registry=metrics.registry, multiprocess_mode="livesum"), configured),
                (Gauge("relay_paused", "1 while delivery is paused",
                       registry=metrics.registry, multiprocess_mode="livemax"),
                 lambda: 1.0 if paused() else 0.0))
        if metrics.shared is None:
            for gauge, read in live:
                gauge.set_function(read)
        else:
            # no scrape reaches the other workers: each writes its numbers every second
            def tick() -> None:
                metrics.flush()
                for gauge, read in live:
                    gauge.set(read())
                loop.call_later(LIVE_INTERVAL, tick)

            loop = asyncio.get_running_loop()
            tick()

    def families(self) -> list[Metric]:
        events = GaugeMetricFamily("relay_feedback_events_stored",
                                   "SES feedback events kept in the database, by type "
                                   "(falls when retention removes old ones)", labels=["type"])
        for kind, n in self.events.items():
            events.add_metric([kind], n)
        return [events, GaugeMetricFamily("relay_suppressions",
                                          "Addresses on the suppression list",
                                          value=self.suppressions),
                *feedback_families(self.stats())]

    async def refresh(self) -> None:
        """Before a scrape: the numbers that live in the database (one short query each)."""
        async with self.db.engine.connect() as conn:
            total = await conn.execute(select(func.count()).select_from(Suppression))
            self.suppressions = total.scalar_one()
            rows = await conn.execute(
                select(FeedbackEvent.kind, func.count()).group_by(FeedbackEvent.kind))
            self.events = dict.fromkeys(FEEDBACK_TYPES, 0)
            for kind, n in rows.all():
                self.events[kind] = n


class TimedSender:
    """A Sender that times each SendEmail call and counts it by outcome."""

    def __init__(self, inner: Sender, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        #: the counter's child per outcome, looked up once (labels() takes a lock)
        self._calls: dict[str, Counter] = {}

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
            outcome = call_outcome(error)
            counter = self._calls.get(outcome)
            if counter is None:
                counter = self._calls[outcome] = self.metrics.ses_calls.labels(outcome)
            counter.inc()
