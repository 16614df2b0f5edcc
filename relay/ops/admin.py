"""Admin HTTP listener: /healthz (alive), /readyz (able to take and send mail), /metrics.

/readyz answers 503 with a reason per dependency that is not there (relay.ops.readiness:
spool not writable or full, database not taking writes, SES not answering) and while
delivery is paused (SES sending disabled, account paused, reputation).
/metrics is Prometheus text from relay.ops.metrics. The console's pages (relay.ops.console)
are added to the same application by relay.service. Reads the spool root and the delivery
pool's state; built by relay.service on admin.host:admin.port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
#: the largest request body the admin listener takes (bytes)
MAX_BODY = 32 * 1024 * 1024


class Admin:
    def __init__(self, *, checks: Callable[[], list[str]],
                 metrics: Callable[[], bytes] | None = None,
                 refresh: Callable[[], Awaitable[None]] | None = None,
                 async_checks: Callable[[], Awaitable[list[str]]] | None = None,
                 routes: Mapping[str, Handler] | None = None) -> None:
        self.checks = checks
        self.metrics = metrics
        self.refresh = refresh
        self.async_checks = async_checks
        # a suppression-list CSV posted to the console may be larger than aiohttp's 1 MB
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        if metrics is not None:
            self.app.router.add_get("/metrics", self.scrape)
        # POST endpoints of other parts (the SNS feedback endpoint)
        for path, handler in (routes or {}).items():
            self.app.router.add_post(path, handler)
        self._runner: web.AppRunner | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self.checks()
        if self.async_checks is not None:
            problems += await self.async_checks()
        if problems:
            text = "not ready\n" + "".join(f"- {p}\n" for p in problems)
            return web.Response(status=503, text=text)
        return web.Response(text="ready\n")

    async def scrape(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        if self.refresh is not None:
            await self.refresh()
        # the spool scan behind the gauges reads directories: keep it off the loop
        body = await asyncio.to_thread(self.metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_METRICS})

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        bound_host, bound_port = sock.getsockname()[:2]
        return str(bound_host), int(bound_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
