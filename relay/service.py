"""The service: builds every part from the configuration and runs them on one loop.

The only place adapters (aiosmtpd ingress, the aioboto3 SES client, the sandbox, the
admin listener) are constructed and wired to the core (spool, delivery pool, limiter,
retry policy). SIGTERM/SIGINT: stop accepting (421), finish in-flight SES calls within
delivery.shutdown_timeout, leave the rest queued. Called by `relay serve`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from relay.config import SANDBOX, Config
from relay.delivery import dsn
from relay.delivery.pool import DeliveryPool
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.settings import Partition, PoolSettings
from relay.feedback.applier import Applied, FeedbackApplier
from relay.feedback.guard import ReputationGuard
from relay.feedback.sns import SnsEndpoint
from relay.feedback.sqs import SqsIngester, queue_region
from relay.ingress.credentials import Credentials
from relay.ingress.server import Ingress, IngressHandler
from relay.log import event
from relay.ops.admin import Admin, spool_writable
from relay.ops.metrics import Metrics, TimedSender
from relay.sandbox.server import Sandbox, SandboxState
from relay.ses.client import SesClient
from relay.spool.commit import GroupCommit
from relay.spool.spool import Envelope, Record, Spool, State, set_worker
from relay.store.budget import shared_budget
from relay.store.db import Database
from relay.store.messages import MessageLog
from relay.store.suppression import SuppressionList

log = logging.getLogger("relay.service")


async def serve(config: Config, *, stop: asyncio.Event | None = None,
                worker: tuple[int, int] = (0, 1)) -> None:
    """Run the relay; `worker` = (index, count) when relay.ops.workers started this process."""
    index, count = worker
    # Spool work runs in threads; a short GIL switch interval keeps the event loop from
    # waiting up to 5 ms for one of them right after a call left the rate limiter.
    sys.setswitchinterval(0.001)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # spool writes wait on fsync, not CPU: enough threads that they overlap
    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="spool"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    spool = Spool(config.spool.dir, fsync=config.spool.fsync,
                  min_free_bytes=config.spool.min_free_bytes)
    if count > 1:
        # the supervisor recovered the spool before starting the workers
        set_worker(index, count)
    else:
        garbage = await asyncio.to_thread(spool.recover)
        event(log, "recovered", spool=str(spool.root), incoming_removed=garbage)

    sandbox: Sandbox | None = None
    endpoint = config.ses.endpoint_url or None
    credentials = None
    if endpoint == SANDBOX:
        sb = config.sandbox
        sandbox = Sandbox(SandboxState(
            outbox=config.sandbox_dir, max_send_rate=sb.max_send_rate,
            max_24hour_send=sb.max_24hour_send, latency=sb.latency, keep_raw=False,
        ))
        endpoint = await sandbox.start(sb.host, sb.port)
        credentials = ("sandbox", "sandbox")
        event(log, "sandbox", url=endpoint, outbox=str(config.sandbox_dir))

    # suppression list, message log, feedback ingester, reputation guard (relay.store.db)
    feedback = await Feedback.open(config, spool)

    dcfg = config.delivery
    reporting_mta = config.smtp.hostname or socket.getfqdn()
    queued_ref: list[Callable[[str], None]] = []

    async def on_failed(record: Record, reason: str) -> None:
        """A permanent failure: tell the envelope sender (RFC 3464) when configured."""
        if not dsn.should_notify(record, dcfg.dsn_from):
            return
        original = await asyncio.to_thread(spool.read_message, State.FAILED, record.id)
        body = dsn.build(record, original, dsn_from=dcfg.dsn_from, reporting_mta=reporting_mta)
        env = Envelope(sender="", recipients=(record.envelope.sender,), received_at=time.time(),
                       client="relay-dsn")
        qid = await asyncio.to_thread(spool.accept, env, body)
        event(log, "dsn_queued", queue_id=qid, original_queue_id=record.id,
              recipient=record.envelope.sender)
        queued_ref[0](qid)

    async with SesClient(config.ses, endpoint_url=endpoint, static_credentials=credentials,
                         max_connections=dcfg.max_concurrency,
                         stamp_departures=endpoint is not None) as ses:
        metrics = Metrics(spool=spool)
        # one group commit: sessions and delivery results share every spool flush
        commit = GroupCommit(spool)
        pool = DeliveryPool(
            spool=spool, sender=TimedSender(ses, metrics), accounts=ses,
            limiter=RateLimiter(dcfg.max_rate or 1.0, guard=dcfg.rate_guard),
            policy=RetryPolicy(dcfg.min_backoff, dcfg.max_backoff, dcfg.max_lifetime),
            settings=PoolSettings.from_config(dcfg, partition=Partition(index, count)),
            on_failed=on_failed, suppressions=feedback.suppressions,
            listeners=[feedback.log, metrics], commit=commit,
        )
        queued = feedback.on_queued(pool.notify)
        queued_ref.append(queued)
        # relays on one PostgreSQL database share the account's rate (relay.store.budget)
        if config.database.shared_rate:
            pool.limiter.budget = await shared_budget(feedback.db)
        # before the pool starts: a relay restarted while the guard had paused it stays paused
        await feedback.start(pool, ses_endpoint=endpoint, credentials=credentials,
                             ingest=index == 0)
        await pool.start()
        auth_users, dkim_signer = _ingress_security(config)
        # metrics: SMTP sessions and replies, messages accepted, pool gauges
        handler = IngressHandler(
            spool=spool, config=config.smtp, listener=_CountedQueued(metrics, queued),
            credentials=auth_users, signer=dkim_signer, commit=commit,
            rcpt_check=feedback.rcpt_suppressed if config.smtp.reject_suppressed else None)
        ingress = Ingress(handler, config.smtp, observer=metrics, reuse_port=count > 1)
        metrics.use_database(feedback.db, feedback.stats)
        metrics.watch(rate=lambda: pool.limiter.rate(time.monotonic()),
                      configured=lambda: pool.limiter.configured,
                      paused=lambda: pool.paused)
        smtp_host, smtp_port = await ingress.start()

        def checks() -> list[str]:
            problems = []
            if not spool_writable(spool.root):
                problems.append(f"spool {spool.root} is not writable")
            if pool.paused:
                problems.append(f"delivery paused: {pool.paused_reason}")
            if handler.closing:
                problems.append("shutting down")
            return problems

        async def database_checks() -> list[str]:
            problem = await metrics.database_problem()
            return [problem] if problem else []

        admin = Admin(checks=checks, metrics=metrics.render, refresh=metrics.refresh,
                      async_checks=database_checks)
        feedback.add_routes(admin.app)
        admin_addr = ""
        if config.admin.enabled and index == 0:
            host, port = await admin.start(config.admin.host, config.admin.port)
            admin_addr = f"{host}:{port}"
        smtps = ":".join(map(str, ingress.tls_address)) if ingress.tls_address else ""
        event(log, "listening", smtp=f"{smtp_host}:{smtp_port}", admin=admin_addr, worker=index,
              rate=pool.limiter.configured, config=config.source, smtps=smtps)

        await stop.wait()
        event(log, "stopping")
        await ingress.close(grace=2.0)
        await pool.stop(dcfg.shutdown_timeout)
        await admin.stop()
        await feedback.stop()
    if sandbox is not None:
        await sandbox.stop()
    event(log, "stopped")


def _ingress_security(
    config: Config,
) -> tuple[Credentials | None, Callable[[bytes], bytes] | None]:
    """AUTH credentials and the DKIM signer for the ingress, when configured."""
    from relay.ingress.dkim import DkimSigner

    credentials = Credentials(config.smtp.auth_file) if config.smtp.auth_file else None
    signer = DkimSigner(config.dkim).sign if config.dkim.enabled else None
    return credentials, signer


# -- suppression list, message log, feedback ingester, reputation guard ---------------


class Feedback:
    """The database-backed parts, wired around one delivery pool."""

    def __init__(self, config: Config, spool: Spool, db: Database) -> None:
        self.config = config
        self.db = db
        self.suppressions = SuppressionList(db)
        self.log = MessageLog(db, spool=spool)
        self.applier = FeedbackApplier(db, soft_bounce_limit=config.feedback.soft_bounce_limit)
        self.ingester: SqsIngester | None = None
        self.guard: ReputationGuard | None = None
        self.sns: SnsEndpoint | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, config: Config, spool: Spool) -> Feedback:
        db = await Database.open(config.database.url, config.spool.dir)
        return cls(config, spool, db)

    def on_queued(self, notify: Callable[[str], None]) -> Callable[..., None]:
        """Ingress callback: write the queued rows, then hand the message to delivery.

        Called as (qid) or, by the ingress, (qid, envelope, first bytes of the message).
        """

        async def queued(qid: str, envelope: Envelope | None, head: bytes | None) -> None:
            try:
                await self.log.queued(qid, envelope=envelope, head=head)
            except Exception as exc:  # noqa: BLE001 - the log must never hold up mail
                event(log, "log_error", level=logging.WARNING, queue_id=qid, error=str(exc))
            notify(qid)

        def callback(qid: str, envelope: Envelope | None = None, head: bytes | None = None) -> None:
            task = asyncio.get_running_loop().create_task(queued(qid, envelope, head))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return callback

    async def rcpt_suppressed(self, address: str) -> bool:
        """RCPT-time check; on a database error accept (delivery checks again)."""
        try:
            return await self.suppressions.is_suppressed(address)
        except Exception as exc:  # noqa: BLE001 - never a 500 at RCPT
            event(log, "suppression_check_failed", level=logging.WARNING, error=str(exc))
            return False

    async def start(self, pool: DeliveryPool, *, ses_endpoint: str | None,
                    credentials: tuple[str, str] | None, ingest: bool = True) -> None:
        """Message log and reputation guard; with `ingest`, the feedback ingester too."""
        fcfg = self.config.feedback
        await self.log.start()
        self.guard = ReputationGuard(
            db=self.db, pause=pool.pause, resume=pool.resume,
            paused_reason=lambda: pool.paused_reason,
            max_bounce_rate=fcfg.max_bounce_rate, max_complaint_rate=fcfg.max_complaint_rate,
            min_sample=fcfg.min_sample, window=fcfg.reputation_window,
            interval=fcfg.guard_interval,
        )
        await self.guard.start()
        queue_url, sqs_endpoint, creds = fcfg.sqs_queue_url, fcfg.sqs_endpoint_url, None
        if self.config.ses.endpoint_url == SANDBOX and ses_endpoint:
            # the embedded sandbox serves the simulator's feedback as an SQS queue
            if not queue_url or sqs_endpoint == SANDBOX:
                queue_url = queue_url or f"{ses_endpoint}/queue/feedback"
                sqs_endpoint, creds = ses_endpoint, credentials
        if queue_url and ingest:
            self.ingester = SqsIngester(
                applier=self.applier, queue_url=queue_url,
                region=queue_region(queue_url, self.config.ses.region),
                endpoint_url=sqs_endpoint or None, static_credentials=creds,
                wait_time=fcfg.wait_time, max_messages=fcfg.max_messages,
                on_applied=self._applied,
            )
            await self.ingester.start()
        if fcfg.sns_endpoint and ingest:
            self.sns = SnsEndpoint(applier=self.applier, topic_arns=fcfg.topic_arns,
                                   on_applied=self._applied)
        if ingest:
            self._tasks.add(asyncio.create_task(self._prune()))

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics: feedback messages by outcome, reputation rates, pause."""
        out: dict[str, float] = {}
        if self.ingester is not None:
            out.update({f"feedback_{k}": float(v) for k, v in self.ingester.counts.items()})
        if self.sns is not None:
            out["sns_rejected"] = float(self.sns.rejected)
        if self.guard is not None:
            rates = self.guard.last
            out.update(bounce_rate=rates.bounce_rate, complaint_rate=rates.complaint_rate,
                       reputation_sample=float(rates.sent),
                       reputation_paused=float(self.guard.paused_reason().startswith("reputation:")))
        return out

    async def _applied(self, applied: Applied) -> None:
        if self.guard is not None:
            self.guard.kick()

    async def _prune(self) -> None:
        while True:
            try:
                removed = await self.log.prune(self.config.database.retention)
                if removed:
                    event(log, "log_pruned", rows=removed)
            except Exception as exc:  # noqa: BLE001
                event(log, "log_error", level=logging.WARNING, error=str(exc))
            await asyncio.sleep(3600)

    def add_routes(self, app: web.Application) -> None:
        if self.sns is not None:
            app.router.add_post("/sns", self.sns.handle)

    async def stop(self) -> None:
        for part in (self.ingester, self.guard):
            if part is not None:
                await part.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sns is not None:
            await self.sns.close()
        await self.log.stop()
        await self.db.close()


class _CountedQueued:
    """The ingress's QueuedListener: counts the message, then hands it on (log, pool)."""

    def __init__(self, metrics: Metrics, notify: Callable[..., None]) -> None:
        self.metrics = metrics
        self.notify = notify

    def queued(self, qid: str, envelope: Envelope | None = None, head: bytes | None = None
               ) -> None:
        self.metrics.accepted.inc()
        self.notify(qid, envelope, head)
