"""Helpers shared by the benchmark scripts: a process's CPU time, a free loopback port,
waiting for a listener, starting `relay serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process plus its live children (relay serve's worker processes)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 30.0) -> None:
    """Until something listens on 127.0.0.1:port; exits the bench if proc ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"relay exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def serve_relay(cfg: Path, port: int, *, tree: Path, cwd: str | Path) -> subprocess.Popen[bytes]:
    """`relay serve -c cfg` from the checkout `tree` (warnings only, stderr drained), once
    it listens on port and its workers have had a second to start."""
    env = dict(os.environ, PYTHONPATH=str(tree), AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench")
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--log-level", "warning"],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threading.Thread(target=lambda: relay.stderr and relay.stderr.read(), daemon=True).start()
    wait_port(port, relay)
    time.sleep(1.0)  # every worker up
    return relay
