"""Admin HTTP listener: /healthz (alive), /readyz (able to take and send mail).

/readyz answers 503 with the reasons when the spool is not writable or delivery is
paused (SES sending disabled, account paused). Reads the spool root and the delivery
pool's state; built by relay.service on admin.host:admin.port.
"""

from __future__ import annotations

import os
from typing import Callable

from aiohttp import web


class Admin:
    def __init__(self, *, checks: Callable[[], list[str]]) -> None:
        self.checks = checks
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self._runner: web.AppRunner | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self.checks()
        if problems:
            return web.Response(status=503, text="not ready\n" + "".join(f"- {p}\n" for p in problems))
        return web.Response(text="ready\n")

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        return site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def spool_writable(root: str | os.PathLike[str]) -> bool:
    return os.access(root, os.W_OK | os.X_OK)
