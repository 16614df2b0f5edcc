"""Shared fixtures: the relay as a real child process, the SES sandbox, moto's server.

Everything binds 127.0.0.1 on ephemeral ports; every process started here is stopped at
teardown; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox.server import SandboxState, SandboxThread

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def readyz(port: int, timeout: float = 30.0) -> tuple[int, str]:
    """The admin listener's /readyz: status and body (503 is an answer, not an error)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class RelayProcess:
    """`relay serve` in a child process, with its JSON log lines collected."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]],
                 preexec: Callable[[], None] | None = None,
                 environ: dict[str, str | None] | None = None) -> None:
        #: changes to the child's environment (None removes a variable)
        self.environ = environ or {}
        self.workdir = workdir
        self.sections = sections
        self.preexec = preexec
        self.spool = Path(sections["spool"]["dir"])
        self.config = write_config(workdir / "relay.toml", sections)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self.smtp_port = 0
        self.admin_port = 0

    def start(self, timeout: float = 30.0) -> RelayProcess:
        self.lines.clear()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        # the child imports this checkout's relay package, whatever is installed
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        for key, value in self.environ.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(self.config)],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=self.preexec,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        listening = wait_for(lambda: self.find("listening") or self._dead(), timeout)
        if not isinstance(listening, dict):
            raise AssertionError("relay did not start:\n" + "\n".join(self.raw_lines[-30:]))
        self.smtp_port = int(listening["smtp"].rsplit(":", 1)[1])
        if listening.get("admin"):
            self.admin_port = int(listening["admin"].rsplit(":", 1)[1])
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with proc.stderr:  # closed at the child's exit: a pipe left open leaks its fd
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.raw_lines.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass

    def find(self, event: str, **match: Any) -> dict[str, Any] | None:
        for line in list(self.lines):
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                return line
        return None

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == event]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def queued(self, state: str = "active") -> list[str]:
        d = self.spool / state
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def relay_sections(
    tmp: Path, endpoint: str, **overrides: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        # one process, whose log and counters a test reads ("auto" is the default: the
        # tests of several workers ask for 2, test_config_cores checks what auto resolves to)
        "smtp": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "spool": {"dir": str(tmp / "spool"), "min_free_bytes": 0},
        "ses": {"endpoint_url": endpoint, "region": "us-east-1"},
        "delivery": {"min_backoff": "0.5s", "max_backoff": "1s", "scan_interval": "0.1s",
                     "pause_probe_interval": "0.3s", "shutdown_timeout": "5s"},
        "admin": {"host": "127.0.0.1", "port": 0},
    }
    if PG_SERVER:
        sections["database"] = {"url": database_for(tmp)}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


#: A PostgreSQL server URL (postgresql://user@host:port/db) to run the suite against:
#: tests/run.sh sets it for its second pass. Empty: SQLite files in each test's spool.
PG_SERVER = os.environ.get("RELAY_TEST_DATABASE_URL", "")

#: the test modules whose outcome depends on the database: the suppression list, the message
#: log, feedback, metrics read from the database, delivery-time checks, shared state between
#: relays. tests/run.sh runs only these again on PostgreSQL (`-m database`).
DATABASE_MODULES = frozenset({
    "test_suppression", "test_tracking", "test_ingester", "test_sns", "test_feedback_moto",
    "test_sandbox_feedback", "test_shared", "test_metrics", "test_delivery", "test_readiness",
    "test_guard", "test_console", "test_migrations",
})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "database: runs again on the PostgreSQL pass")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in DATABASE_MODULES:
            item.add_marker(pytest.mark.database)


_databases: dict[str, str] = {}


def database_for(tmp: Path) -> str:
    """database.url for the test using `tmp`: "" (SQLite in its spool directory) or, on
    the PostgreSQL pass, a database of its own, created on first use."""
    if not PG_SERVER:
        return ""
    key = str(tmp)
    if key not in _databases:
        name = f"t_{os.getpid()}_{len(_databases)}"
        out = subprocess.run(["psql", PG_SERVER, "-v", "ON_ERROR_STOP=1", "-q",
                              "-c", f'DROP DATABASE IF EXISTS "{name}"',
                              "-c", f'CREATE DATABASE "{name}"'],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _databases[key] = PG_SERVER.rsplit("/", 1)[0] + "/" + name
    return _databases[key]


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def start(endpoint: str, preexec: Callable[[], None] | None = None,
              **overrides: dict[str, Any]) -> RelayProcess:
        relay = RelayProcess(tmp_path, relay_sections(tmp_path, endpoint, **overrides), preexec)
        started.append(relay)
        return relay.start()

    yield start
    for relay in started:
        relay.kill()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxThread]:
    sb = SandboxThread(SandboxState(outbox=tmp_path / "sandbox-mail", max_send_rate=1000,
                                    max_24hour_send=-1))
    sb.start()
    yield sb
    sb.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


RECEIVED = re.compile(
    rb"Received: from [^\r\n]+\r\n\tby [^\r\n]+ \(relay\) with E?SMTPS?A?;\r\n\t[^\r\n]+\r\n")


def relayed(raw: bytes) -> bytes:
    """The bytes after the relay's own Received line, which must come first.

    The relay changes nothing else in a message that already has Date and Message-ID and
    no Bcc header, so tests compare relayed(what SES got) with what the client sent.
    """
    m = RECEIVED.match(raw)
    assert m, raw[:300]
    return raw[m.end():]


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[Any]:
    """Starts in-process ingress servers (tests/ingress_server.py); stops them after."""
    from tests.ingress_server import make_ingress

    start = make_ingress(tmp_path)
    yield start
    for server in start.started:
        server.stop()
