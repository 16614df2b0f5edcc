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
import time
from typing import Callable

from relay.admin import Admin, spool_writable
from relay.config import SANDBOX, Config
from relay.delivery import DeliveryPool
from relay.log import event
from relay.metrics import Metrics, TimedSender, instrument_ingress
from relay.ratelimit import RateLimiter
from relay.retry import RetryPolicy
from relay.sandbox import Sandbox, SandboxState
from relay.ses import SesClient
from relay.smtp import Ingress, IngressHandler
from relay.spool import Spool

log = logging.getLogger("relay.service")


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
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
    async with SesClient(config.ses, endpoint_url=endpoint, static_credentials=credentials,
                         max_connections=dcfg.max_concurrency) as ses:
        metrics = Metrics(spool=spool)
        pool = DeliveryPool(
            spool=spool, sender=TimedSender(ses, metrics), accounts=ses, listeners=[metrics],
            limiter=RateLimiter(dcfg.max_rate or 1.0),
            policy=RetryPolicy(dcfg.min_backoff, dcfg.max_backoff, dcfg.max_lifetime),
            max_rate=dcfg.max_rate, max_concurrency=dcfg.max_concurrency,
            ready_queue=dcfg.ready_queue, scan_interval=dcfg.scan_interval,
            throttle_retry=dcfg.throttle_retry, account_refresh=dcfg.account_refresh,
            pause_probe_interval=dcfg.pause_probe_interval,
        )
        await pool.start()
        handler = IngressHandler(spool=spool, config=config.smtp, on_queued=pool.notify)
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
        event(log, "listening", smtp=f"{smtp_host}:{smtp_port}", admin=admin_addr,
              rate=pool.limiter.configured, config=config.source)

        await stop.wait()
        event(log, "stopping")
        await ingress.close(grace=2.0)
        await pool.stop(dcfg.shutdown_timeout)
        await admin.stop()
    if sandbox is not None:
        await sandbox.stop()
    event(log, "stopped")


def _counted(metrics: Metrics, notify: Callable[[str], None]) -> Callable[[str], None]:
    def queued(qid: str) -> None:
        metrics.accepted.inc()
        notify(qid)
    return queued
