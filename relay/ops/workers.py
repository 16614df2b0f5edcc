"""`relay serve` with smtp.workers > 1: a supervisor and one process per worker.

One Python process runs on one core, so with several workers the parent becomes a small
supervisor: it locks the spool (relay.spool.lock; every worker inherits the lock, so it
lasts until the last of them exits) and recovers it once (clearing incoming/ while
nobody writes there),
reserves the listening ports when the configuration says 0, starts `relay serve --worker I`
for each worker with the same configuration, restarts a worker that dies (at most
MAX_RESTARTS within RESTART_WINDOW seconds, then stops everything and exits 1), and passes
SIGTERM/SIGINT on so every worker finishes its in-flight calls.

With smtp.pin_workers and one worker per core of the affinity mask, worker i is pinned to
the i-th of those cores (its threads too, restarted or not): its loop and the threads it
hands work to share one core's caches.

Each worker listens on the same port with SO_REUSEPORT, writes into the same spool with
queue ids in its own partition (relay.spool.record.partition), and delivers that partition at
1/workers of the account's rate and quota. Worker 0 also runs the feedback ingester and
the admin listener; the workers' counters meet in <spool>/.metrics (prometheus_client's
multiprocess mode: emptied at start, a dead worker's counts kept, its live gauges dropped),
so worker 0's /metrics counts every worker.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from relay.config import SANDBOX, Config
from relay.config_cores import workers as worker_count
from relay.errors import ConfigError
from relay.log import event
from relay.ops.metrics import MULTIPROC_ENV
from relay.spool.lock import SpoolLock
from relay.spool.spool import Spool

log = logging.getLogger("relay.workers")

MAX_RESTARTS = 5
METRICS_DIR = ".metrics"
RESTART_WINDOW = 60.0
WORKERS_ENV = "RELAY_SMTP__WORKERS"


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


def _in_child(core: int | None) -> None:
    """In the child before exec: die with the supervisor, run on `core` if given."""
    _die_with_parent()
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except OSError:
            pass  # the mask changed meanwhile: left to the kernel


def worker_cores(config: Config, count: int) -> list[int] | None:
    """The core each worker runs on: with smtp.pin_workers and one worker per core of
    the affinity mask, worker i on the i-th; None (the kernel places them) otherwise."""
    if not config.smtp.pin_workers or count < 2:
        return None
    try:
        mask = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None
    return mask if len(mask) == count else None


def _reserve(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: holds an ephemeral port for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _reserve_ports(config: Config) -> tuple[list[socket.socket], dict[str, str]]:
    """Ports the configuration leaves to the system (0), held so every worker binds the same
    one: the held sockets, and the environment overrides that name the ports to workers."""
    held: list[socket.socket] = []
    env: dict[str, str] = {}
    if config.smtp.port == 0:
        held.append(_reserve(config.smtp.host, 0))
        env["RELAY_SMTP__PORT"] = str(held[-1].getsockname()[1])
    if config.smtp.implicit_tls and config.smtp.tls_port == 0:
        held.append(_reserve(config.smtp.host, 0))
        env["RELAY_SMTP__TLS_PORT"] = str(held[-1].getsockname()[1])
    return held, env


class _Supervisor:
    """The worker processes: start them, restart the ones that die, pass signals on."""

    def __init__(self, *, env: dict[str, str], config_path: str | None, log_level: str,
                 lock: SpoolLock, cores: list[int] | None = None) -> None:
        self.env = env
        #: the core of each worker (None: not pinned), see worker_cores()
        self.cores = cores
        #: the spool's lock, passed to every worker: held until the last one exits
        self.lock = lock
        self.config_path = config_path
        self.log_level = log_level
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.restarts: list[float] = []
        self.status = 0

    def spawn(self, index: int) -> None:
        args = [sys.executable, "-m", "relay", "serve", "--worker", str(index),
                "--log-level", self.log_level]
        if self.config_path:
            args += ["-c", self.config_path]
        core = self.cores[index] if self.cores else None
        self.procs[index] = subprocess.Popen(args, env=self.env,
                                             preexec_fn=functools.partial(_in_child, core),
                                             pass_fds=(self.lock.fd,))

    def stop(self, signum: int, frame: object) -> None:
        """Signal handler: pass the signal to every live worker; restart none from now on."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> int:
        """Until every worker has exited: 0, or 1 when they failed too often and were stopped."""
        while self.procs:
            time.sleep(0.2)
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[index]
                # its counters stay in the sum; its gauges (rate, paused) leave it
                if MULTIPROC_ENV in self.env:
                    mark_process_dead(proc.pid, self.env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
                if not self.stopping:
                    self._exited(index, code)
        return self.status

    def _exited(self, index: int, code: int) -> None:
        """A worker died on its own: restart it, unless workers die too often."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            event(log, "workers_failing", level=logging.ERROR, worker=index, exit_code=code,
                  restarts=len(self.restarts) - 1, window=RESTART_WINDOW)
            self.status = 1
            self.stop(signal.SIGTERM, None)
            return
        event(log, "worker_restarted", level=logging.ERROR, worker=index, exit_code=code)
        self.spawn(index)


def _metrics_dir(spool: Spool) -> Path:
    """<spool>/.metrics, emptied: counts of an earlier run must not add to this one's."""
    shared = spool.root / METRICS_DIR
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir()
    return shared


def supervise(config: Config, *, config_path: str | None, log_level: str) -> int:
    check(config)
    count = worker_count(config)
    spool = Spool(config.spool.dir, fsync=config.spool.fsync)
    # before recovery: a second relay, or old workers still finishing, stop us here
    lock = SpoolLock.take(spool.root)
    event(log, "recovered", spool=str(spool.root), incoming_removed=spool.recover())

    held, ports = _reserve_ports(config)
    shared = _metrics_dir(spool)
    # the count as resolved here ("auto" included), so every worker agrees on the partitions
    env = dict(os.environ) | ports | {MULTIPROC_ENV: str(shared), WORKERS_ENV: str(count)}
    cores = worker_cores(config, count)
    workers = _Supervisor(env=env, config_path=config_path, log_level=log_level, lock=lock,
                          cores=cores)
    signal.signal(signal.SIGTERM, workers.stop)
    signal.signal(signal.SIGINT, workers.stop)
    for index in range(count):
        workers.spawn(index)
    event(log, "workers", count=count, pids=[p.pid for p in workers.procs.values()],
          cores=cores)

    status = workers.wait()
    for sock in held:
        sock.close()
    lock.release()
    event(log, "stopped")
    return status


__all__ = ["check", "supervise", "worker_cores"]
