"""A throwaway PostgreSQL server on loopback that a test may stop and start again.

initdb in a temporary directory, owned by the `postgres` user when the tests run as root
(as tests/run.sh does); every wait is bounded and stop() removes it all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def pg_bin() -> Path | None:
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                   key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
    return roots[-1] if roots and (roots[-1] / "initdb").exists() else None


class PgCluster:
    def __init__(self) -> None:
        bindir = pg_bin()
        assert bindir is not None, "PostgreSQL server binaries are not installed"
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-t", "60", "start", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "-t", "60",
                  "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except AssertionError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)
