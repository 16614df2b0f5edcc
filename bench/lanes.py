"""Lanes benchmark: does a password reset wait behind a newsletter?

An SES account at 20 recipients/s (the sandbox, enforcing it with 429s), a backlog of
2,000 bulk messages already queued, then one transactional message per second over SMTP.
Prints the transactional 250 -> SES time (p50, p99, max) and the rate each backlogged lane
achieved meanwhile; then the same with three lanes of weights 6/3/1 (transactional,
standard with a backlog of 1,000, bulk with 2,000). `relay serve` runs as a child process.

    .venv/bin/python bench/lanes.py [--seconds 30] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402
from relay.spool.record import Envelope  # noqa: E402
from relay.spool.spool import Spool  # noqa: E402

TWO = '[[lanes.lane]]\nname = "transactional"\nweight = 9\n' \
      '[[lanes.lane]]\nname = "bulk"\nweight = 1\n'
THREE = '[[lanes.lane]]\nname = "transactional"\nweight = 6\n' \
        '[[lanes.lane]]\nname = "standard"\nweight = 3\n' \
        '[[lanes.lane]]\nname = "bulk"\nweight = 1\n'


def fill(spool_dir: Path, backlog: dict[str, int]) -> None:
    spool = Spool(spool_dir, fsync=False)
    spool.ensure()
    body = (b"From: news@example.com\r\nSubject: bench\r\nPrecedence: bulk\r\n\r\n"
            + b"x" * 5000 + b"\r\n")
    now = time.time()
    for lane, n in backlog.items():
        for i in range(n):
            spool.accept(Envelope("news@example.com", (f"{lane}{i}@{lane}.example",), now,
                                  lane=lane), body)


def start(tmp: Path, url: str, lanes: str) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp / "relay.toml"
    config.write_text(
        f'[smtp]\nhost = "127.0.0.1"\nport = 0\n[spool]\ndir = "{tmp / "spool"}"\n'
        f'min_free_bytes = 0\nfsync = false\n[ses]\nendpoint_url = "{url}"\n'
        '[admin]\nenabled = false\n[delivery]\nscan_interval = "0.5s"\n' + lanes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)],
                            cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    port: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for raw in proc.stderr:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") == "listening":
                    port.append(int(line["smtp"].rsplit(":", 1)[1]))
                    ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise SystemExit("relay did not start")
    return proc, port[0]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))] if s else float("nan")


def run(name: str, lanes: str, backlog: dict[str, int], seconds: float, rate: float) -> None:
    state = SandboxState(max_send_rate=rate, max_24hour_send=-1, keep_raw=False,
                         latency=0.05)
    with tempfile.TemporaryDirectory() as tmpdir, SandboxThread(state) as sb:
        tmp = Path(tmpdir)
        fill(tmp / "spool", backlog)
        proc, port = start(tmp, sb.url, lanes)
        try:
            time.sleep(2.0)  # the backlog is flowing before the first transactional message
            began = time.time()
            acked: dict[str, float] = {}
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                for i in range(int(seconds)):
                    target = began + i
                    time.sleep(max(0.0, target - time.time()))
                    rcpt = f"t{i}@tx.example"
                    s.sendmail("app@example.com", [rcpt],
                               f"From: app@example.com\r\nSubject: reset {i}\r\n\r\nhi\r\n")
                    acked[rcpt] = time.time()
            deadline = time.time() + 30
            while time.time() < deadline:
                got = {r for c in state.accepted() for r in c.recipients if r in acked}
                if len(got) == len(acked):
                    break
                time.sleep(0.05)
            ended = time.time()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        arrived = {r: c.arrived for c in state.accepted() for r in c.recipients}
        waits = [arrived[r] - t for r, t in acked.items() if r in arrived]
        window = ended - began
        per_lane: dict[str, int] = {}
        for c in state.accepted():
            if began <= c.arrived <= ended:
                lane = c.recipients[0].rsplit("@", 1)[1].split(".")[0]
                per_lane[lane] = per_lane.get(lane, 0) + len(c.recipients)
        tx_rate = per_lane.get("tx", 0) / window
        left = rate - tx_rate
        print(f"\n{name}: account {rate:g}/s, backlog "
              + ", ".join(f"{lane} {n}" for lane, n in backlog.items())
              + f", one transactional message per second for {int(seconds)} s")
        print(f"  transactional 250 -> SES: n={len(waits)}/{len(acked)}  "
              f"p50 {pct(waits, 0.5):.3f} s  p99 {pct(waits, 0.99):.3f} s  "
              f"max {max(waits, default=float('nan')):.3f} s")
        for lane in backlog:
            got = per_lane.get(lane, 0) / window
            print(f"  {lane:12} {got:6.2f} recipients/s  ({got / left:.0%} of the "
                  f"{left:.2f}/s left by transactional)")
        print(f"  total {sum(per_lane.values()) / window:.2f}/s over {window:.1f} s; "
              f"throttles {state.throttles}; worst 1 s window "
              f"{state.max_window(1.0)} (departure), {state.max_window(1.0, by_arrival=True)}"
              " (arrival)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=20.0)
    args = ap.parse_args()
    run("two lanes (9/1)", TWO, {"bulk": 2000}, args.seconds, args.rate)
    run("three lanes (6/3/1)", THREE, {"standard": 1000, "bulk": 2000}, args.seconds,
        args.rate)


if __name__ == "__main__":
    main()
