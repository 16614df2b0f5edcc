"""A spool of N messages: how long `relay queue stats` takes, and the memory of recovery.

    python bench/queue_scale.py [--messages 100000] [--serve-seconds 10]

Fills a fresh spool (fsync off, arrival times spread over two days, 60% deferred, 35%
active, 5% hold), times `relay queue stats` (deferred-domain table sampled, --exact, and
--no-domains),
then runs `relay serve` on it under /usr/bin/time -v (embedded sandbox, sending enabled)
and prints its peak RSS beside the same run on a spool of 1,000. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.spool import Envelope, Spool, State  # noqa: E402


def fill(root: Path, n: int, rng: random.Random) -> None:
    spool = Spool(root, fsync=False)
    spool.ensure()
    now = time.time()
    domains = [f"d{i}.example" for i in range(40)]
    body = b"From: app@example.com\r\nSubject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"
    for i in range(n):
        born = now - rng.uniform(0, 2 * 86400)
        qid = f"{int(born * 1e6):013X}{i & 0xFFFFF:05X}"
        rcpts = tuple(f"u{i}-{k}@{rng.choice(domains)}" for k in range(rng.randint(1, 3)))
        spool.accept(Envelope("app@example.com", rcpts, born), body, qid=qid)
        r = rng.random()
        if r < 0.60:
            nxt = now + rng.uniform(60, 4000)
            spool.move(qid, State.ACTIVE, State.DEFERRED, when=nxt)
        elif r < 0.65:
            spool.move(qid, State.ACTIVE, State.HOLD)


def config(root: Path, spool: Path) -> Path:
    path = root / "relay.toml"
    path.write_text(f"""[smtp]\nport = 0\n[spool]\ndir = "{spool}"\nmin_free_bytes = 0\n
[ses]\nendpoint_url = "sandbox"\n[sandbox]\nmax_send_rate = 200.0\nmax_24hour_send = 10000000.0
dir = "{root / 'mail'}"\n[admin]\nenabled = false\n""")
    return path


def run(cmd: list[str]) -> tuple[float, str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return time.perf_counter() - t0, out.stdout, out.stderr


def serve_rss(cfg: Path, seconds: float) -> tuple[int, int]:
    """Peak RSS (KB) of `relay serve` over `seconds`, and the recipients it sent."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, "-m", "relay", "serve",
                             "-c", str(cfg)], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    # SIGTERM the relay itself (GNU time would die of it and leave the relay running)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    sent = sum(line.count('"event": "sent"') for line in err.splitlines())
    return rss, sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--serve-seconds", type=float, default=10.0)
    args = ap.parse_args()
    rng = random.Random(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1000, args.messages):
            root = Path(tmp) / str(n)
            t0 = time.perf_counter()
            fill(root / "spool", n, rng)
            filled = time.perf_counter() - t0
            cfg = config(root, root / "spool")
            relay = [sys.executable, "-m", "relay", "queue"]
            t_stats, out, _ = run(relay + ["stats", "-c", str(cfg)])
            t_exact, _, _ = run(relay + ["stats", "--exact", "-c", str(cfg)])
            t_fast, _, _ = run(relay + ["stats", "--no-domains", "-c", str(cfg)])
            rss, sent = serve_rss(cfg, args.serve_seconds)
            rows.append((n, filled, t_stats, t_exact, t_fast, rss, sent))
            if n == args.messages:
                print(out)
    print(f"{'messages':>9} {'fill s':>7} {'stats s':>8} {'--exact s':>10} "
          f"{'--no-domains s':>15} {'serve peak RSS MB':>18} {'sent in run':>11}")
    for n, filled, t_stats, t_exact, t_fast, rss, sent in rows:
        print(f"{n:>9} {filled:>7.1f} {t_stats:>8.2f} {t_exact:>10.2f} {t_fast:>15.2f} "
              f"{rss / 1024:>18.1f} {sent:>11}")


if __name__ == "__main__":
    main()
