"""Delivery benchmark: how exactly the relay drains its spool at a given SES rate.

For each rate, fills a fresh spool with single-recipient messages, starts `relay serve`
as a child process against the sandbox (MaxSendRate = the rate, enforced with 429s;
50 ms latency per call) and prints: configured rate, achieved recipients/s, the worst
one-second window the sandbox counted (by the relay's departure stamps, and by arrival,
which adds this machine's scheduling jitter), throttles, and the relay's CPU ms per message.

    .venv/bin/python bench/delivery.py [--rates 50,100,200,400] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import tree_cpu_seconds  # noqa: E402

from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402
from relay.spool.record import Envelope, set_worker  # noqa: E402
from relay.spool.spool import Spool  # noqa: E402


def fill(spool_dir: Path, n: int, workers: int) -> None:
    spool = Spool(spool_dir, fsync=False)
    spool.ensure()
    body = b"From: bench@example.com\r\nSubject: bench\r\n\r\n" + b"x" * 5000 + b"\r\n"
    now = time.time()
    for i in range(n):
        # ids spread over the workers' partitions, as if each had accepted its share
        set_worker(i % workers, workers)
        spool.accept(Envelope("bench@example.com", (f"r{i}@example.net",), now), body)
    set_worker(0, 1)


def run(rate: float, seconds: float, latency: float, workers: int) -> dict[str, float]:
    n = max(200, int(rate * seconds))
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        fill(tmpdir / "spool", n, workers)
        state = SandboxState(max_send_rate=rate, max_24hour_send=-1, latency=latency,
                             keep_raw=False)
        with SandboxThread(state) as sb:
            cfg = tmpdir / "relay.toml"
            cfg.write_text(
                f'[smtp]\nport = 0\nworkers = {workers}\n'
                f'[spool]\ndir = "{tmpdir / "spool"}"\nmin_free_bytes = 0\n'
                f'[ses]\nendpoint_url = "{sb.url}"\n'
                f'[delivery]\nmax_concurrency = 500\nscan_interval = "0.2s"\n'
                f'[admin]\nenabled = false\n'
            )
            env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench")
            proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(cfg),
                                     "--log-level", "warning"], env=env, cwd=tmp,
                                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
            errors: list[str] = []
            threading.Thread(target=lambda: errors.extend(
                line.decode() for line in proc.stderr), daemon=True).start()  # type: ignore[union-attr]
            deadline = time.monotonic() + seconds * 3 + 30
            while not state.accepted() and time.monotonic() < deadline:
                time.sleep(0.01)
            # CPU from the first delivery on: start-up (imports, recovery) is not per message
            cpu0, sent0 = tree_cpu_seconds(proc.pid), state.recipients_sent()
            while state.recipients_sent() < n and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit("relay exited:\n" + "".join(errors[-20:]))
                time.sleep(0.1)
            cpu = tree_cpu_seconds(proc.pid) - cpu0
            proc.terminate()
            proc.wait(timeout=30)
        times = sorted(c.at for c in state.accepted())
        sent = len(times)
        achieved = (sent - 1) / (times[-1] - times[0]) if sent > 1 else 0.0
        return {
            "rate": rate,
            "messages": n,
            "delivered": sent,
            "achieved": achieved,
            "worst_window": state.max_window(1.0),
            "worst_arrival": state.max_window(1.0, by_arrival=True),
            "throttles": state.throttles,
            "cpu_ms": cpu * 1000 / max(sent - sent0, 1),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,100,200,300,400,600")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workers", type=int, default=1,
                        help="relay worker processes (smtp.workers), each at rate/workers")
    args = parser.parse_args()
    rows = []
    print(f"relay workers: {args.workers}")
    print(f"{'rate/s':>7} {'msgs':>6} {'delivered':>9} {'achieved/s':>10} {'%':>6} "
          f"{'worst 1s':>8} {'(arrival)':>9} {'throttles':>9} {'CPU ms/msg':>10}")
    for rate in (float(r) for r in args.rates.split(",")):
        r = run(rate, args.seconds, args.latency, args.workers)
        rows.append(r)
        print(f"{r['rate']:>7.0f} {r['messages']:>6} {r['delivered']:>9} {r['achieved']:>10.1f} "
              f"{100 * r['achieved'] / r['rate']:>6.1f} {r['worst_window']:>8} "
              f"{r['worst_arrival']:>9} "
              f"{r['throttles']:>9} {r['cpu_ms']:>10.2f}", flush=True)
    ok = [r["rate"] for r in rows
          if r["delivered"] == r["messages"] and r["achieved"] >= 0.98 * r["rate"]
          and r["throttles"] == 0]
    print(f"highest sustained rate (>= 98% of configured, no throttles): "
          f"{max(ok) if ok else 'none'}/s at {args.latency * 1000:.0f} ms SES latency")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
