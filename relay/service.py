"""The service: builds every part from the configuration, then starts them on one loop.

The only place adapters (aiosmtpd ingress, the SES client, the sandbox, the admin
listener, the SQS and SNS feedback endpoints) are constructed and wired to the core
(spool, delivery pool, limiter, retry policy, suppression list, message log, guard).
build() constructs each part with everything it needs, in dependency order; Relay.start()
then starts them. SIGTERM/SIGINT: stop accepting (421), finish in-flight SES calls within
delivery.shutdown_timeout, leave the rest queued. Called by `relay serve`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field

from relay.config import SANDBOX, Config, FeedbackConfig
from relay.delivery.account import BY_REPUTATION, BY_SES, Gate
from relay.delivery.dsn import DsnWriter
from relay.delivery.pool import DeliveryPool
from relay.delivery.ports import QueuedListener
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.scheduler import Scheduler
from relay.delivery.settings import Partition, PoolSettings
from relay.errors import ConfigError
from relay.feedback.applier import AppliedBatch, FeedbackApplier
from relay.feedback.guard import GuardSettings, ReputationGuard
from relay.feedback.sns import SnsEndpoint, Verifier
from relay.feedback.sqs import queue_region
from relay.feedback.thread import IngesterThread, ingester_thread
from relay.ingress.credentials import Credentials
from relay.ingress.server import Ingress, IngressHandler
from relay.log import event
from relay.ops.admin import Admin
from relay.ops.console.wiring import install_console
from relay.ops.metrics import Gauges, Metrics, TimedSender
from relay.ops.readiness import SesWatch, database_problems, spool_problems
from relay.sandbox.server import Sandbox, SandboxState
from relay.sandbox.signing import CERT_PATH, signing_key
from relay.sandbox.simulator import sandbox_topic
from relay.ses.client import SesClient
from relay.spool.commit import GroupCommit
from relay.spool.lock import SpoolLock
from relay.spool.record import Envelope, set_worker
from relay.spool.spool import Spool
from relay.store.budget import shared_budget
from relay.store.db import Database
from relay.store.messages import MessageLog
from relay.store.suppression import SuppressionList
from relay.threads import background

log = logging.getLogger("relay.service")

#: seconds between message-log retention passes
PRUNE_INTERVAL = 3600.0


async def serve(config: Config, *, stop: asyncio.Event | None = None,
                worker: tuple[int, int] = (0, 1)) -> None:
    """Run the relay; `worker` = (index, count) when relay.ops.workers started this process."""
    stop = stop or asyncio.Event()
    _prepare_loop(stop)
    part = Partition(*worker)
    spool, lock = await _open_spool(config, part)
    async with AsyncExitStack() as stack:
        stack.callback(lock.release)
        stack.callback(spool.close)
        sandbox = await _start_sandbox(config)
        if sandbox is not None:
            stack.push_async_callback(sandbox.stop)
        endpoint = sandbox.url if sandbox is not None else (config.ses.endpoint_url or None)
        creds = SANDBOX_CREDENTIALS if sandbox is not None else None
        db = await Database.open(config.database.url, config.spool.dir,
                                 lock_timeout=config.database.lock_timeout)
        stack.push_async_callback(db.close)
        ses = await stack.enter_async_context(SesClient(
            config.ses, endpoint_url=endpoint, static_credentials=creds,
            max_connections=config.delivery.max_concurrency,
            stamp_departures=endpoint is not None))
        relay = await build(config, spool=spool, db=db, ses=ses, partition=part,
                            sqs=_feedback_queue(config, endpoint, creds),
                            verifier=_verifier(config, sandbox))
        await relay.start()
        gc.freeze()  # start-up's ~100,000 objects live on: no full collection walks them
        await stop.wait()
        event(log, "stopping")
        await relay.stop()
    event(log, "stopped")


def _prepare_loop(stop: asyncio.Event) -> None:
    # a short GIL switch interval: the loop never waits 5 ms for a thread's spool work
    sys.setswitchinterval(0.001)
    loop = asyncio.get_running_loop()
    # spool writes wait on fsync, not CPU: enough threads that they overlap
    loop.set_default_executor(ThreadPoolExecutor(64, "spool", background))
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def _open_spool(config: Config, part: Partition) -> tuple[Spool, SpoolLock]:
    """The spool, locked before anything in it is touched (relay.spool.lock)."""
    spool = Spool(config.spool.dir, fsync=config.spool.fsync,
                  min_free_bytes=config.spool.min_free_bytes)
    if part.count > 1:
        # the supervisor locked and recovered the spool before starting the workers
        lock = SpoolLock.take(spool.root, worker=part.index)
        set_worker(part.index, part.count)
    else:
        lock = SpoolLock.take(spool.root)
        garbage = await asyncio.to_thread(spool.recover)
        event(log, "recovered", spool=str(spool.root), incoming_removed=garbage)
    spool.open()  # the root, held for syncfs's write-back errors from now on
    return spool, lock


SANDBOX_CREDENTIALS = ("sandbox", "sandbox")


@dataclass(frozen=True)
class StartedSandbox:
    sandbox: Sandbox
    url: str

    async def stop(self) -> None:
        await self.sandbox.stop()


async def _start_sandbox(config: Config) -> StartedSandbox | None:
    """The embedded SES (ses.endpoint_url = "sandbox"), started before anything calls it."""
    if config.ses.endpoint_url != SANDBOX:
        return None
    sb = config.sandbox
    state = SandboxState(
        outbox=config.sandbox_dir, max_send_rate=sb.max_send_rate,
        max_24hour_send=sb.max_24hour_send, latency=sb.latency, keep_raw=False,
        event_delay=sb.event_delay, complaint_delay=sb.complaint_delay,
    )
    try:
        state.script(*sb.faults)
    except ValueError as exc:
        raise ConfigError("sandbox.faults", str(exc)) from None
    sandbox = Sandbox(state)
    url = await sandbox.start(sb.host, sb.port)
    event(log, "sandbox", url=url, outbox=str(config.sandbox_dir))
    return StartedSandbox(sandbox, url)


def _verifier(config: Config, sandbox: StartedSandbox | None) -> Verifier:
    """The one SNS envelope check (SQS path and /sns). The embedded sandbox's signing key
    is trusted for its own certificate URL and topic, and only when it is embedded."""
    topics, pinned = set(config.feedback.topic_arns), {}
    if sandbox is not None:
        topics.add(sandbox_topic())
        pinned[sandbox.url + CERT_PATH] = signing_key().public_key
    return Verifier(topic_arns=topics, pinned=pinned)


@dataclass(frozen=True)
class FeedbackQueue:
    url: str
    endpoint: str | None
    credentials: tuple[str, str] | None


def _feedback_queue(config: Config, ses_endpoint: str | None,
                    credentials: tuple[str, str] | None) -> FeedbackQueue | None:
    """The SQS queue to read feedback from; the embedded sandbox serves the simulator's."""
    fcfg = config.feedback
    url, endpoint, creds = fcfg.sqs_queue_url, fcfg.sqs_endpoint_url, None
    if config.ses.endpoint_url == SANDBOX and ses_endpoint:
        if not url or endpoint == SANDBOX:
            url = url or f"{ses_endpoint}/queue/feedback"
            endpoint, creds = ses_endpoint, credentials
    return FeedbackQueue(url, endpoint or None, creds) if url else None


# -- glue between parts ------------------------------------------------------------------


class QueuedFanout:
    """A message became durable in active/: write its queued rows, then hand it to
    delivery. The log write never holds up mail: on error the message goes on anyway."""

    def __init__(self, *, message_log: MessageLog, scheduler: Scheduler) -> None:
        self.message_log = message_log
        self.scheduler = scheduler
        self.tasks: set[asyncio.Task[None]] = set()

    def queued(self, qid: str, envelope: Envelope | None = None, head: bytes | None = None
               ) -> None:
        task = asyncio.get_running_loop().create_task(self._queued(qid, envelope, head))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _queued(self, qid: str, envelope: Envelope | None, head: bytes | None) -> None:
        try:
            await self.message_log.queued(qid, envelope=envelope, head=head)
        except Exception as exc:  # noqa: BLE001 - the log must never hold up mail
            event(log, "log_error", level=logging.WARNING, queue_id=qid, error=str(exc))
        self.scheduler.notify(qid, envelope)


class CountedQueued:
    """The ingress's QueuedListener: counts the message accepted, then hands it on."""

    def __init__(self, metrics: Metrics, inner: QueuedListener) -> None:
        self.metrics = metrics
        self.inner = inner

    def queued(self, qid: str, envelope: Envelope | None = None, head: bytes | None = None
               ) -> None:
        self.metrics.accepted.inc()
        if envelope is not None:
            self.metrics.lane_queued.labels(envelope.lane).inc()
        self.inner.queued(qid, envelope, head)


def rcpt_check(suppressions: SuppressionList) -> Callable[[str], Awaitable[bool]]:
    """RCPT-time check (smtp.reject_suppressed); on a database error accept: delivery
    checks again, and a 500 at RCPT would be worse."""

    async def suppressed(address: str) -> bool:
        try:
            return await suppressions.is_suppressed(address)
        except Exception as exc:  # noqa: BLE001 - never a 500 at RCPT
            event(log, "suppression_check_failed", level=logging.WARNING, error=str(exc))
            return False

    return suppressed


async def prune(message_log: MessageLog, retention: float) -> None:
    """Drop message-log rows past database.retention, once an hour."""
    while True:
        try:
            removed = await message_log.prune(retention)
            if removed:
                event(log, "log_pruned", rows=removed)
        except Exception as exc:  # noqa: BLE001 - retention must not stop the relay
            event(log, "log_error", level=logging.WARNING, error=str(exc))
        await asyncio.sleep(PRUNE_INTERVAL)


# -- the parts, built in order -----------------------------------------------------------


@dataclass
class Relay:
    """Every running part of one relay process, in the order they start."""

    config: Config
    partition: Partition
    message_log: MessageLog
    guard: ReputationGuard
    ingester: IngesterThread | None
    sns: SnsEndpoint | None
    pool: DeliveryPool
    fanout: QueuedFanout
    ingress: Ingress
    admin: Admin
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: its plain session and reply counts are flushed into the counters at stop
    metrics: Metrics | None = None

    async def start(self) -> None:
        await self.message_log.start()
        # before the pool starts: a relay restarted while the guard had paused it stays paused
        await self.guard.start()
        if self.ingester is not None:
            await self.ingester.start()
        if self.partition.index == 0:
            self.tasks.append(asyncio.create_task(
                prune(self.message_log, self.config.database.retention), name="prune"))
        await self.pool.start()
        smtp_host, smtp_port = await self.ingress.start()
        admin = ""
        if self.config.admin.enabled and self.partition.index == 0:
            host, port = await self.admin.start(self.config.admin.host, self.config.admin.port)
            admin = f"{host}:{port}"
        tls = self.ingress.tls_address
        event(log, "listening", smtp=f"{smtp_host}:{smtp_port}", admin=admin,
              worker=self.partition.index, rate=self.pool.limiter.configured,
              config=self.config.source, smtps=":".join(map(str, tls)) if tls else "")

    async def stop(self) -> None:
        await self.ingress.close(grace=2.0)
        if self.metrics is not None:
            self.metrics.flush()  # the last sessions' counts (several workers: a shared file)
        await self.pool.stop(self.config.delivery.shutdown_timeout)
        await self.admin.stop()
        for part in (self.ingester, self.guard):
            if part is not None:
                await part.stop()
        tasks = [*self.tasks, *self.fanout.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.sns is not None:
            await self.sns.close()
        await self.message_log.stop()


async def build(config: Config, *, spool: Spool, db: Database, ses: SesClient,
                partition: Partition, sqs: FeedbackQueue | None,
                verifier: Verifier | None = None) -> Relay:
    """Every part, each constructed with what it needs; nothing is started here."""
    dcfg, fcfg = config.delivery, config.feedback
    ingest = partition.index == 0
    metrics = Metrics(spool=spool, lanes=config.lanes.names)
    # one group commit: sessions and delivery results share every spool flush
    commit = GroupCommit(spool)
    suppressions = SuppressionList(db)
    message_log = MessageLog(db, spool=spool)
    # relays on one PostgreSQL database share the account's rate (relay.store.budget)
    budget = await shared_budget(db) if config.database.shared_rate else None
    limiter = RateLimiter(dcfg.max_rate or 1.0, guard=dcfg.rate_guard, budget=budget)
    settings = PoolSettings.from_config(dcfg, partition=partition)
    scheduler = Scheduler(spool=spool, gate=Gate(), settings=settings, clock=time.time,
                          lanes=config.lanes)
    fanout = QueuedFanout(message_log=message_log, scheduler=scheduler)
    dsn = DsnWriter(spool=spool, listener=fanout, dsn_from=dcfg.dsn_from,
                    reporting_mta=config.smtp.hostname or socket.getfqdn())
    # how the last SendEmail calls ended, for /readyz
    watch = SesWatch(TimedSender(ses, metrics))
    pool = DeliveryPool(
        spool=spool, sender=watch, accounts=ses, limiter=limiter,
        policy=RetryPolicy(dcfg.min_backoff, dcfg.max_backoff, dcfg.max_lifetime),
        settings=settings, scheduler=scheduler, on_failed=dsn.failed,
        suppressions=suppressions, listeners=[message_log, metrics], commit=commit,
    )
    guard = ReputationGuard(
        db=db, scheduler=scheduler, unlogged=message_log.unlogged,  # its own pause, not SES's
        pause=lambda reason: pool.pause(reason, by=BY_REPUTATION),
        resume=lambda: pool.resume(by=BY_REPUTATION),
        paused_reason=lambda: pool.pauses.get(BY_REPUTATION, ""),
        settings=guard_settings(fcfg, partition, blind=sqs is None and not fcfg.sns_endpoint))

    async def applied(_: AppliedBatch) -> None:
        guard.kick()

    applier = FeedbackApplier(db, soft_bounce_limit=fcfg.soft_bounce_limit)
    verifier = verifier or Verifier(topic_arns=fcfg.topic_arns)
    ingester = ingester_thread(
        config, verifier, queue_url=sqs.url, region=queue_region(sqs.url, config.ses.region),
        endpoint_url=sqs.endpoint, static_credentials=sqs.credentials,
        on_batch=lambda _: guard.kick()) if sqs is not None and ingest else None
    sns = SnsEndpoint(applier=applier, verifier=verifier, on_batch=applied
                      ) if fcfg.sns_endpoint and ingest else None
    ingress = _ingress(config, spool=spool, commit=commit, metrics=metrics,
                       listener=CountedQueued(metrics, fanout), suppressions=suppressions,
                       reuse_port=partition.count > 1)
    gauges = Gauges(metrics, db=db, stats=_feedback_stats(ingester, sns, guard, pool),
                    rate=lambda: limiter.rate(time.monotonic()),
                    configured=lambda: limiter.configured, paused=lambda: pool.paused)

    missing = _missing_credentials(ses)

    def checks() -> list[str]:
        problems = [*missing, *spool_problems(spool.root, config.spool.min_free_bytes)]
        problems += pool.holds  # results the spool could not record; database down
        problems += [p for p in (watch.problem(), message_log.problem()) if p]
        problems += [f"delivery paused: {why}" for why in pool.pauses.values()]  # SES, guard
        if ingress.handler.closing:
            problems.append("shutting down")
        return problems

    async def database() -> list[str]:
        return await database_problems(db)

    admin = Admin(checks=checks, metrics=metrics.render, refresh=gauges.refresh,
                  async_checks=database, notes=guard.notes,
                  routes={"/sns": sns.handle} if sns is not None else {})
    if config.admin.console and ingest:
        # the console's pages at / on the same listener (relay.ops.console)
        install_console(admin.app, config=config, spool=spool, db=db,
                        suppressions=suppressions, pool=pool, limiter=limiter, guard=guard,
                        checks=checks, async_checks=database)
    return Relay(config=config, partition=partition, message_log=message_log, guard=guard,
                 ingester=ingester, sns=sns, pool=pool, fanout=fanout, ingress=ingress,
                 admin=admin, metrics=metrics)


def _ingress(config: Config, *, spool: Spool, commit: GroupCommit, metrics: Metrics,
             listener: QueuedListener, suppressions: SuppressionList,
             reuse_port: bool) -> Ingress:
    """The SMTP listener, with AUTH credentials and the DKIM signer when configured."""
    from relay.ingress.dkim import DkimSigner  # dkimpy loads only where signing is on

    handler = IngressHandler(
        spool=spool, config=config.smtp, listener=listener, commit=commit,
        credentials=Credentials(config.smtp.auth_file) if config.smtp.auth_file else None,
        signer=DkimSigner(config.dkim).sign if config.dkim.enabled else None,
        rcpt_check=rcpt_check(suppressions) if config.smtp.reject_suppressed else None,
        lanes=config.lanes)
    return Ingress(handler, config.smtp, observer=metrics, reuse_port=reuse_port)


def _missing_credentials(ses: SesClient) -> list[str]:
    """/readyz's reason while the AWS SDK found no credentials (logged once at start): the
    relay would accept mail that can never leave."""
    if ses.has_credentials:
        return []
    reason = ("ses: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
              "AWS_PROFILE, a web identity token, or an instance or task role)")
    event(log, "no_credentials", level=logging.ERROR, reason=reason)
    return [reason]


def _feedback_stats(ingester: IngesterThread | None, sns: SnsEndpoint | None,
                    guard: ReputationGuard, pool: DeliveryPool) -> Callable[[], dict[str, float]]:
    """Numbers for /metrics: feedback messages by outcome, reputation rates, each pause."""

    def stats() -> dict[str, float]:
        out: dict[str, float] = {}
        if ingester is not None:
            out.update(ingester.stats())
        if sns is not None:
            out["sns_rejected"] = float(sns.rejected)
            out["sns_unparseable"] = float(sns.unparseable)
        rates = guard.last
        out.update(bounce_rate=rates.bounce_rate, complaint_rate=rates.complaint_rate,
                   reputation_sample=float(rates.judged),
                   reputation_paused=float(BY_REPUTATION in pool.pauses),
                   ses_paused=float(BY_SES in pool.pauses))
        out.update(guard.stats())
        return out

    return stats


def guard_settings(fcfg: FeedbackConfig, partition: Partition, *,
                   blind: bool) -> GuardSettings:
    """The reputation guard's settings: this worker's share of the unjudged sends a lane
    may make; blind (no feedback source), said once."""
    if blind and partition.index == 0:
        event(log, "reputation_guard_blind", level=logging.WARNING,
              reason="no feedback source (feedback.sqs_queue_url or feedback.sns_endpoint): "
                     "the reputation guard sees no bounce or complaint")
    return GuardSettings.from_config(fcfg, share=1.0 / partition.count, blind=blind)
