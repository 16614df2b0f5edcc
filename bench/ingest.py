"""Ingest benchmark: the relay against Postfix under the same smtp-source load.

Postfix's smtp-source (Debian package `postfix`) sends N messages of SIZE bytes over S
parallel sessions, once to the relay (fsync before 250, delivering to a sandbox process
with its rate cap high) and once to a private Postfix instance on loopback relaying to
smtp-sink (Postfix also fsyncs its queue file before 250). Prints messages/s for each and
the ratio relay/Postfix. Needs root for the private Postfix instance.

    .venv/bin/python bench/ingest.py [--messages 20000] [--sessions 20,100] [--size 5120]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """Seconds smtp-source takes to deliver `messages` to 127.0.0.1:port."""
    args = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-f", "bench@example.com", "-t", "sink@example.net", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"smtp-source failed: {out.stdout}{out.stderr}")
    return elapsed


class Postfix:
    """A private Postfix instance: own config and queue, loopback, relaying to smtp-sink."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "postfix"
        self.conf = self.dir / "conf"
        self.port = free_port()
        self.sink_port = free_port()
        self.sink: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.conf.mkdir(parents=True)
        os.chmod(self.dir.parent, 0o755)  # Postfix's own processes must reach their queue
        queue = self.dir / "queue"
        data = self.dir / "data"
        data.mkdir()
        queue.mkdir()
        shutil.chown(data, "postfix", "postfix")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        master = (self.conf / "master.cf").read_text().replace(
            "smtp      inet  n       -       y       -       -       smtpd",
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
        )
        (self.conf / "master.cf").write_text(master)
        (self.conf / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {queue}",
            f"data_directory = {data}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = bench.localdomain",
            "mydestination =",
            "local_transport = error:local delivery disabled",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "default_process_limit = 200",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0",
            "maillog_file = /dev/null",
            "maillog_file_prefixes = /dev",
            "",
        ]))
        self.sink = subprocess.Popen(
            ["smtp-sink", "-c", f"127.0.0.1:{self.sink_port}", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for verb in ("check", "start"):
            out = subprocess.run(["postfix", "-c", str(self.conf), verb],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"postfix {verb} failed (run as root?): {out.stdout}{out.stderr}")
        wait_port(self.port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        if self.sink:
            self.sink.terminate()
            self.sink.wait(timeout=10)


class Relay:
    """`relay serve` delivering to a `relay sandbox` process with a high rate."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench")
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "relay", "sandbox", "--rate", "100000"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.procs.append(sandbox)
        assert sandbox.stdout is not None
        url = json.loads(sandbox.stdout.readline())["url"]
        cfg = self.tmp / "relay.toml"
        cfg.write_text(
            f'[smtp]\nport = {self.port}\nmax_connections = 1000\nworkers = {self.workers}\n'
            f'max_connections_per_client = 1000\n'
            f'[spool]\ndir = "{self.tmp / "spool"}"\nmin_free_bytes = 0\n'
            f'[ses]\nendpoint_url = "{url}"\n'
            f'[delivery]\nmax_rate = 100000\nmax_concurrency = 200\n'
            f'[admin]\nenabled = false\n'
        )
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--log-level", "warning"],
            env=env, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.procs.append(relay)
        threading.Thread(target=lambda: relay.stderr and relay.stderr.read(), daemon=True).start()
        wait_port(self.port)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--sessions", default="20,100")
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--skip-postfix", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="relay worker processes (smtp.workers; default: the cores)")
    args = parser.parse_args()
    if not shutil.which("smtp-source"):
        raise SystemExit("smtp-source not found: apt-get install postfix")
    print(f"{args.messages} messages of {args.size} bytes, fsync before 250 on both sides, "
          f"relay workers: {args.workers}")
    print(f"{'sessions':>8} {'relay msg/s':>12} {'postfix msg/s':>14} {'relay/postfix':>14}")
    for sessions in (int(s) for s in args.sessions.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            relay = Relay(Path(tmp), workers=args.workers)
            relay.start()
            try:
                relay_rate = args.messages / smtp_source(relay.port, args.messages, sessions,
                                                         args.size)
            finally:
                relay.stop()
        postfix_rate = float("nan")
        if not args.skip_postfix:
            with tempfile.TemporaryDirectory() as tmp:
                pf = Postfix(Path(tmp))
                pf.start()
                try:
                    postfix_rate = args.messages / smtp_source(pf.port, args.messages, sessions,
                                                               args.size)
                finally:
                    pf.stop()
        print(f"{sessions:>8} {relay_rate:>12.0f} {postfix_rate:>14.0f} "
              f"{relay_rate / postfix_rate:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
