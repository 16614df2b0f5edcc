"""End-to-end benchmark: SMTP in, SES sandbox out (50 ms per call), rate cap high.

A load process sends N messages over S parallel SMTP sessions (each with a unique
Message-ID, noting when its 250 came); `relay serve` runs as a child process; the sandbox
(in this process) notes when each message's SendEmail arrived. Prints end-to-end
messages/s, the relay's CPU ms per message, and p50/p99 of the time from 250 to SES.

    .venv/bin/python bench/e2e.py [--messages 5000] [--sessions 20] [--size 5120]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import free_port, serve_relay, tree_cpu_seconds  # noqa: E402

from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

LOAD = r'''
import json, smtplib, sys, threading, time
port, n, sessions, size = (int(a) for a in sys.argv[1:5])
out = sys.argv[5]
body = ("x" * 76 + "\r\n") * max(1, size // 78)
done, lock, nxt = {}, threading.Lock(), [0]
def worker():
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
        s.ehlo("load.example")
        while True:
            with lock:
                i = nxt[0]; nxt[0] += 1
            if i >= n:
                return
            msg = (f"From: load@example.com\r\nTo: sink@example.net\r\nSubject: m{i}\r\n"
                   f"Message-ID: <m{i}@bench.example>\r\n"
                   "Date: Mon, 23 Nov 2026 00:00:00 +0000\r\n\r\n" + body)
            s.sendmail("load@example.com", ["sink@example.net"], msg.encode())
            done[i] = time.time()
ts = [threading.Thread(target=worker) for _ in range(sessions)]
start = time.time()
[t.start() for t in ts]; [t.join() for t in ts]
json.dump({"start": start, "done": done}, open(out, "w"))
'''


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="relay worker processes (smtp.workers; default: the cores)")
    args = parser.parse_args()
    n = args.messages
    state = SandboxState(max_send_rate=1e6, max_24hour_send=-1, latency=args.latency)
    with tempfile.TemporaryDirectory() as tmp, SandboxThread(state) as sb:
        tmpdir = Path(tmp)
        port = free_port()
        cfg = tmpdir / "relay.toml"
        cfg.write_text(
            f'[smtp]\nport = {port}\nmax_connections_per_client = 1000\nworkers = {args.workers}\n'
            f'[spool]\ndir = "{tmpdir / "spool"}"\nmin_free_bytes = 0\n'
            f'[ses]\nendpoint_url = "{sb.url}"\n'
            f'[delivery]\nmax_rate = 1000000\nmax_concurrency = 500\n[admin]\nenabled = false\n'
        )
        relay = serve_relay(cfg, port, tree=ROOT, cwd=tmp)
        cpu0 = tree_cpu_seconds(relay.pid)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own0 = time.process_time()
        out = tmpdir / "load.json"
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(port), str(n), str(args.sessions),
                                 str(args.size), str(out)])
        load.wait(timeout=3600)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
        deadline = time.monotonic() + 600
        while len(state.accepted()) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = tree_cpu_seconds(relay.pid) - cpu0
        sandbox_cpu = time.process_time() - own0
        relay.terminate()
        relay.wait(timeout=60)
        loaded = json.loads(out.read_text())
    accepted = {}
    for call in state.accepted():
        m = re.search(rb"Message-ID: <m(\d+)@bench\.example>", call.raw)
        if m:
            accepted[int(m.group(1))] = call.arrived
    done = {int(k): v for k, v in loaded["done"].items()}
    lat = [accepted[i] - done[i] for i in done if i in accepted]
    elapsed = max(accepted.values()) - loaded["start"]
    print(f"{n} messages of ~{args.size} bytes, {args.sessions} SMTP sessions, "
          f"SES latency {args.latency * 1000:.0f} ms, rate cap off, relay workers: {args.workers}")
    print(f"{'delivered':>9} {'e2e msg/s':>10} {'ingest msg/s':>12} {'CPU ms/msg':>10} "
          f"{'250->SES p50 ms':>15} {'p99 ms':>8} {'load ms/msg':>11} {'sandbox ms/msg':>14}")
    ingest = n / (max(done.values()) - loaded["start"])
    print(f"{len(accepted):>9} {len(accepted) / elapsed:>10.0f} {ingest:>12.0f} "
          f"{cpu * 1000 / n:>10.2f} {pct(lat, 0.5) * 1000:>15.0f} {pct(lat, 0.99) * 1000:>8.0f} "
          f"{load_cpu * 1000 / n:>11.2f} {sandbox_cpu * 1000 / n:>14.2f}")
    print("CPU ms/msg: the relay's processes; load: the SMTP client; sandbox: the SES "
          "endpoint (this process). All share the machine's cores.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
