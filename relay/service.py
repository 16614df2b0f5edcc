"""The service: builds every part from the configuration and runs them on one loop.

The only place adapters (aiosmtpd ingress, the aioboto3 SES client, the sandbox, the
admin listener) are constructed and wired to the core (spool, delivery pool, limiter,
retry policy). SIGTERM/SIGINT: stop accepting (421), finish in-flight SES calls within
delivery.shutdown_timeout, leave the rest queued. Called by `relay serve`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
import signal
import socket
import sys
import time
from typing import Callable

from relay import dsn
from relay.admin import Admin, spool_writable
from relay.auth import Credentials
from relay.config import SANDBOX, Config
from relay.delivery import DeliveryPool
from relay.log import event
from relay.metrics import Metrics, TimedSender, instrument_ingress
from relay.ratelimit import RateLimiter
from relay.retry import RetryPolicy
from relay.sandbox import Sandbox, SandboxState
from relay.ses import SesClient
from relay.smtp import Ingress, IngressHandler
from relay.spool import Envelope, Record, Spool, State

log = logging.getLogger("relay.service")


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
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

    dcfg = config.delivery
    reporting_mta = config.smtp.hostname or socket.getfqdn()
    pool_ref: list[DeliveryPool] = []

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
        pool_ref[0].notify(qid)

    async with SesClient(config.ses, endpoint_url=endpoint, static_credentials=credentials,
                         max_connections=dcfg.max_concurrency,
                         stamp_departures=endpoint is not None) as ses:
        metrics = Metrics(spool=spool)
        pool = DeliveryPool(
            spool=spool, sender=TimedSender(ses, metrics), accounts=ses, listeners=[metrics],
            limiter=RateLimiter(dcfg.max_rate or 1.0, guard=dcfg.rate_guard),
            policy=RetryPolicy(dcfg.min_backoff, dcfg.max_backoff, dcfg.max_lifetime),
            max_rate=dcfg.max_rate, max_concurrency=dcfg.max_concurrency,
            ready_queue=dcfg.ready_queue, scan_interval=dcfg.scan_interval,
            throttle_retry=dcfg.throttle_retry, account_refresh=dcfg.account_refresh,
            pause_probe_interval=dcfg.pause_probe_interval, on_failed=on_failed,
        )
        pool_ref.append(pool)
        await pool.start()
        auth_users, dkim_signer = _ingress_security(config)
        handler = IngressHandler(spool=spool, config=config.smtp, on_queued=pool.notify,
                                 credentials=auth_users, signer=dkim_signer)
        ingress = Ingress(handler, config.smtp)
        # metrics: SMTP sessions and replies, messages accepted, pool gauges
        instrument_ingress(ingress, metrics)
        handler.on_queued = _counted(metrics, pool.notify)
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

        admin = Admin(checks=checks, metrics=metrics.render)
        admin_addr = ""
        if config.admin.enabled:
            host, port = await admin.start(config.admin.host, config.admin.port)
            admin_addr = f"{host}:{port}"
        smtps = ":".join(map(str, ingress.tls_address)) if ingress.tls_address else ""
        event(log, "listening", smtp=f"{smtp_host}:{smtp_port}", admin=admin_addr,
              rate=pool.limiter.configured, config=config.source, smtps=smtps)

        await stop.wait()
        event(log, "stopping")
        await ingress.close(grace=2.0)
        await pool.stop(dcfg.shutdown_timeout)
        await admin.stop()
    if sandbox is not None:
        await sandbox.stop()
    event(log, "stopped")


def _ingress_security(
    config: Config,
) -> tuple[Credentials | None, Callable[[bytes], bytes] | None]:
    """AUTH credentials and the DKIM signer for the ingress, when configured."""
    from relay.dkim import DkimSigner

    credentials = Credentials(config.smtp.auth_file) if config.smtp.auth_file else None
    signer = DkimSigner(config.dkim).sign if config.dkim.enabled else None
    return credentials, signer


def _counted(metrics: Metrics, notify: Callable[[str], None]) -> Callable[[str], None]:
    def queued(qid: str) -> None:
        metrics.accepted.inc()
        notify(qid)
    return queued
