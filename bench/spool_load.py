"""The relay's CPU and system calls per message under Postfix's smtp-source.

smtp-source (Debian package `postfix`) sends N messages of 5000 bytes over 20 sessions, a
new connection per message, to `relay serve` (the checkout given by --tree, default this
one) delivering to the SES sandbox in this process (20 ms per call, no rate cap). Prints
accepted and delivered messages/s and the relay's CPU ms per message; with --strace, the
relay's system calls per message (`strace -c -f -p`, which slows everything: CPU figures
from such a run mean nothing) and the most frequent of them.

    .venv/bin/python bench/spool_load.py [--messages 5000] [--workers 1] [--tree DIR] [--strace]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--strace", action="store_true")
    args = parser.parse_args()
    if shutil.which("smtp-source") is None:
        raise SystemExit("needs smtp-source: apt-get install postfix (and stop its daemon)")
    sys.path[:0] = [str(args.tree), str(args.tree / "bench")]
    from common import free_port, serve_relay, tree_cpu_seconds

    from relay.sandbox.server import SandboxState, SandboxThread
    n = args.messages
    state = SandboxState(max_send_rate=1e6, max_24hour_send=-1, latency=0.02, keep_raw=False)
    with tempfile.TemporaryDirectory() as tmp, SandboxThread(state) as sb:
        port, cfg = free_port(), Path(tmp) / "relay.toml"
        cfg.write_text(
            f'[smtp]\nport = {port}\nmax_connections_per_client = 1000\n'
            f'workers = {args.workers}\n[spool]\ndir = "{Path(tmp) / "spool"}"\n'
            f'min_free_bytes = 0\n[ses]\nendpoint_url = "{sb.url}"\n[delivery]\n'
            f'max_rate = 1000000\nmax_concurrency = 500\n[admin]\nenabled = false\n')
        relay = serve_relay(cfg, port, tree=args.tree, cwd=tmp)
        report = Path(tmp) / "strace.txt"
        tracer = None
        if args.strace:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(report), "-p",
                                       str(relay.pid)], stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu0, start = tree_cpu_seconds(relay.pid), time.time()
        subprocess.run(["smtp-source", "-s", "20", "-m", str(n), "-l", "5000",
                        "-f", "load@example.com", "-t", "sink@example.net",
                        f"127.0.0.1:{port}"], check=True, timeout=3600)
        accepted = time.time()
        while len(state.accepted()) < n and time.time() - accepted < 600:
            time.sleep(0.05)
        delivered = time.time()
        cpu = tree_cpu_seconds(relay.pid) - cpu0
        if tracer is not None:
            tracer.terminate()
            tracer.wait(timeout=60)
        relay.terminate()
        relay.wait(timeout=60)
        print(f"{n} messages (smtp-source -s 20 -l 5000), relay workers {args.workers}, "
              f"tree {args.tree}")
        print(f"accepted {n / (accepted - start):.0f}/s, delivered "
              f"{len(state.accepted())} at {n / (delivered - start):.0f}/s, relay CPU "
              f"{cpu * 1000 / n:.2f} ms/msg{' (under strace)' if tracer else ''}")
        if tracer is not None:
            text = report.read_text()
            total = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)", text, re.M)
            rows = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", text,
                              re.M)
            print(f"system calls per message: {int(total.group(1)) / n:.1f}"
                  if total else text)
            print("  " + ", ".join(f"{name} {int(c) / n:.1f}" for c, name in rows[:24]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
