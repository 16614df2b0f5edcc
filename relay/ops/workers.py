"""`relay serve` with smtp.workers > 1: a supervisor and one process per worker.

One Python process runs on one core, so with several workers the parent becomes a small
supervisor: it recovers the spool once (clearing incoming/ while nobody writes there),
reserves the listening ports when the configuration says 0, starts `relay serve --worker I`
for each worker with the same configuration, restarts a worker that dies (at most
MAX_RESTARTS within RESTART_WINDOW seconds, then stops everything and exits 1), and passes
SIGTERM/SIGINT on so every worker finishes its in-flight calls.

Each worker listens on the same port with SO_REUSEPORT, writes into the same spool with
queue ids in its own partition (relay.spool.record.partition), and delivers that partition at
1/workers of the account's rate and quota. Worker 0 also runs the feedback ingester and
the admin listener.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from relay.config import SANDBOX, Config
from relay.errors import ConfigError
from relay.log import event
from relay.spool.spool import Spool

log = logging.getLogger("relay.workers")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def check(config: Config) -> None:
    if config.smtp.workers > 1 and config.ses.endpoint_url == SANDBOX:
        raise ConfigError("smtp.workers", "the embedded sandbox runs in one process: use "
                          "workers = 1, or a separate `relay sandbox` as ses.endpoint_url")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reserve(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: holds an ephemeral port for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(config: Config, *, config_path: str | None, log_level: str) -> int:
    check(config)
    count = config.smtp.workers
    spool = Spool(config.spool.dir, fsync=config.spool.fsync)
    event(log, "recovered", spool=str(spool.root), incoming_removed=spool.recover())

    env = dict(os.environ)
    held: list[socket.socket] = []
    if config.smtp.port == 0:
        held.append(_reserve(config.smtp.host, 0))
        env["RELAY_SMTP__PORT"] = str(held[-1].getsockname()[1])
    if config.smtp.implicit_tls and config.smtp.tls_port == 0:
        held.append(_reserve(config.smtp.host, 0))
        env["RELAY_SMTP__TLS_PORT"] = str(held[-1].getsockname()[1])

    def spawn(index: int) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "relay", "serve", "--worker", str(index),
                "--log-level", log_level]
        if config_path:
            args += ["-c", config_path]
        return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    procs: dict[int, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        procs[index] = spawn(index)
    event(log, "workers", count=count, pids=[p.pid for p in procs.values()])

    restarts: list[float] = []
    status = 0
    while procs:
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del procs[index]
            if stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > MAX_RESTARTS:
                event(log, "workers_failing", level=logging.ERROR, worker=index, exit_code=code,
                      restarts=len(restarts) - 1, window=RESTART_WINDOW)
                status = 1
                stop(signal.SIGTERM, None)
                continue
            event(log, "worker_restarted", level=logging.ERROR, worker=index, exit_code=code)
            procs[index] = spawn(index)
    for sock in held:
        sock.close()
    event(log, "stopped")
    return status


__all__ = ["check", "supervise"]
