"""Builds the console from the running relay's parts and installs it on the admin
application: the sources it reads (spool queue, database, suppression list, pool status,
guard rates, readiness) and the login settings (admin.console_login, admin.console_token).
Called by relay.service.build when admin.console is on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.config import SANDBOX, Config
from relay.delivery.pool import DeliveryPool
from relay.delivery.ratelimit import RateLimiter
from relay.ingress.credentials import Credentials
from relay.ops.console.pages import Console
from relay.ops.console.security import Guard
from relay.ops.console.sources import Sources, Status, reputation_of
from relay.spool.queue import Queue
from relay.spool.spool import Spool
from relay.store.db import Database
from relay.store.suppression import SuppressionList


def login_guard(config: Config) -> Guard:
    """The console's login rules from [admin]."""
    admin = config.admin
    verify: Callable[[str, str], bool] | None = None
    if admin.console_login == "credentials":  # with smtp.auth_file (relay.config.load)
        creds = Credentials(config.smtp.auth_file)

        def verify(name: str, password: str) -> bool:
            return creds.verify(name, password) is not None

    return Guard(host=admin.host, token=admin.console_token, verify=verify,
                 allowed_hosts=admin.allowed_hosts)


def install_console(app: web.Application, *, config: Config, spool: Spool, db: Database,
                    suppressions: SuppressionList, pool: DeliveryPool, limiter: RateLimiter,
                    guard: Any, checks: Callable[[], list[str]],
                    async_checks: Callable[[], Awaitable[list[str]]]) -> Console:
    lanes = tuple(config.lanes.names)

    def status() -> Status:
        return Status(paused=pool.paused, paused_reason=pool.paused_reason,
                      holds=tuple(pool.holds), account=pool.account,
                      configured_rate=limiter.configured, reputation=reputation_of(guard),
                      lanes=lanes)

    async def readiness() -> list[str]:
        return [*checks(), *await async_checks()]

    sources = Sources(queue=Queue(spool), db=db, suppressions=suppressions, status=status,
                      readiness=readiness, lanes=lanes,
                      sandbox_dir=config.sandbox_dir if config.ses.endpoint_url == SANDBOX
                      else None)
    console = Console(sources, login_guard(config))
    console.install(app)
    return console
