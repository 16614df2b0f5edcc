"""Feedback benchmark: SES events applied per second, idle and busy, and event -> suppression.

`relay serve` runs as a child process. Parts 1 and 2 read a sandbox's SQS queue (the
sandbox runs in this process) filled at once with N realistic SES events (the mailbox
simulator's Delivery, Bounce and Complaint documents: unique MessageIds and feedbackIds,
about 10% bounces and 1% complaints; raw delivery), first with the relay idle, then while
smtp-source (Postfix's load generator) sends it mail that it delivers to the sandbox.
Part 3 runs the relay with its embedded sandbox (signed SNS envelopes, verified) at
delivery.max_rate recipients/s to simulator addresses, delivery notifications on, and
reads from its database how long each SES event took to be applied and each bounce or
complaint to suppress its address.

    .venv/bin/python bench/feedback.py [--events 20000] [--sends 3000] [--rate 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import free_port, tree_cpu_seconds, wait_port  # noqa: E402

from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402
from relay.sandbox.simulator import DOMAIN, notifications  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench",
           AWS_SECRET_ACCESS_KEY="bench")

#: [feedback] lines no rate can pass: these benches measure the feedback path, not the guard
GUARD_OFF = ("max_bounce_rate = 1\naccount_max_bounce_rate = 1\nmax_complaint_rate = 1\n"
             "account_max_complaint_rate = 1\nmax_unjudged_sends = 0\n")


LOAD = r'''
import smtplib, sys, threading
port, n, sessions, domain = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rcpt(i):
    local = "bounce" if i % 10 == 3 else "complaint" if i % 100 == 7 else "success"
    return f"{local}+{i}@{domain}"
def session(first):  # every sessions-th message from `first` on
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
        for i in range(first, n, sessions):
            s.sendmail("load@example.com", [rcpt(i)], (
                f"From: load@example.com\r\nTo: {rcpt(i)}\r\nSubject: m{i}\r\n"
                f"Message-ID: <m{i}@bench.example>\r\n\r\nhello\r\n").encode())
ts = [threading.Thread(target=session, args=(k,)) for k in range(sessions)]
[t.start() for t in ts]; [t.join() for t in ts]
'''


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]



def start_relay(tmp: Path, sections: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    spool = tmp / f"spool-{port}"
    cfg = tmp / f"relay-{port}.toml"
    cfg.write_text(f'[smtp]\nport = {port}\nmax_connections_per_client = 1000\n'
                   f'connection_rate_limit = 1000000\n'
                   f'[spool]\ndir = "{spool}"\nmin_free_bytes = 0\n[admin]\nenabled = false\n'
                   + sections)
    # BENCH_LOG_FILE=path: the relay's info log goes there (else warnings, discarded)
    log = os.environ.get("BENCH_LOG_FILE")
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(cfg), "--log-level",
         "info" if log else "warning"],
        env=ENV, cwd=tmp, stdout=subprocess.DEVNULL,
        stderr=open(log, "wb") if log else subprocess.PIPE)  # noqa: SIM115
    threading.Thread(target=lambda: relay.stderr and relay.stderr.read(), daemon=True).start()
    wait_port(port, relay)
    return relay, port, spool / "relay.db"


def events(n: int) -> list[str]:
    """N SES documents (raw delivery bodies) as the simulator makes them, timed now."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        local = "bounce" if i % 10 == 3 else "complaint" if i % 100 == 7 else "success"
        rcpt = f"{local}+{uuid.uuid4().hex[:12]}@{DOMAIN}"
        mid = f"{int(time.time() * 1000):016x}-{uuid.uuid4()}-000000"
        out += [json.dumps(d) for d in notifications(
            message_id=mid, sender="app@example.com", recipients=[rcpt], raw=b"Subject: x\r\n\r\n")]
        i += 1
    return out[:n]


def lags(db: Path, since: float) -> list[float]:
    with sqlite3.connect(db) as conn:
        return [r - o for r, o in conn.execute(
            "SELECT received_at, occurred_at FROM feedback_events WHERE received_at >= ?",
            (since,))]


def drain(state: SandboxState, relay: subprocess.Popen[bytes], db: Path, n: int
          ) -> dict[str, float]:
    bodies = events(n)
    cpu0, sent0 = tree_cpu_seconds(relay.pid), len(state.accepted())
    start = time.time()
    for body in bodies:
        state.feedback.send(body)
    while len(state.feedback) and time.time() - start < 600:
        time.sleep(0.02)
    elapsed = time.time() - start
    cpu = tree_cpu_seconds(relay.pid) - cpu0
    lag = lags(db, start - 1)
    return {"events": n, "per_s": n / elapsed, "p50": pct(lag, 0.5), "p99": pct(lag, 0.99),
            "cpu_ms": cpu * 1000 / n, "smtp_sent_per_s": (len(state.accepted()) - sent0) / elapsed,
            "cpu_share": cpu / elapsed}


def throughput(n: int, receivers: int) -> list[tuple[str, dict[str, float]]]:
    state = SandboxState(max_send_rate=1e6, max_24hour_send=-1, keep_raw=False,
                         raw_delivery=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, SandboxThread(state) as sb:
        relay, port, db = start_relay(Path(tmp), (
            f'[ses]\nendpoint_url = "{sb.url}"\n[delivery]\nmax_rate = 1000000\n'
            f'max_concurrency = 200\n[feedback]\nsqs_queue_url = "{sb.url}/queue/feedback"\n'
            f'sqs_endpoint_url = "{sb.url}"\nraw_delivery = true\nwait_time = "1s"\n'
            # the synthetic events are not about the mail sent meanwhile
            f'receivers = {receivers}\n' + GUARD_OFF))
        try:
            time.sleep(1.0)
            rows.append(("idle", drain(state, relay, db, n)))
            load = subprocess.Popen(
                ["smtp-source", "-s", "20", "-l", "2048", "-m", "10000000", "-f",
                 "bench@example.com", "-t", "sink@example.net", f"127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(3.0)  # SMTP in and SES out at full speed first
                sent0, cpu0 = len(state.accepted()), tree_cpu_seconds(relay.pid)
                time.sleep(10.0)
                rows.append(("busy, no feedback", {
                    "events": 0, "per_s": 0.0, "p50": float("nan"), "p99": float("nan"),
                    "cpu_ms": float("nan"),
                    "smtp_sent_per_s": (len(state.accepted()) - sent0) / 10.0,
                    "cpu_share": (tree_cpu_seconds(relay.pid) - cpu0) / 10.0}))
                rows.append(("busy (SMTP in + SES out)", drain(state, relay, db, n)))
            finally:
                load.terminate()
                load.wait(timeout=30)
        finally:
            relay.terminate()
            relay.wait(timeout=60)
    return rows


def end_to_end(sends: int, rate: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        relay, port, db = start_relay(Path(tmp), (
            f'[ses]\nendpoint_url = "sandbox"\n[sandbox]\nmax_send_rate = {rate * 10:g}\n'
            f'max_24hour_send = -1\n[delivery]\nmax_rate = {rate:g}\n[feedback]\n'
            # a 10% bouncing list would pause the guard: it is the feedback path measured
            'wait_time = "1s"\n' + GUARD_OFF))
        try:
            subprocess.run([sys.executable, "-c", LOAD, str(port), str(sends), "10", DOMAIN],
                           check=True, timeout=3600)
            deadline = time.time() + sends / rate + 120
            want = sends + sends // 100  # a delivery each, a complaint on top for 1%
            while time.time() < deadline:
                with sqlite3.connect(db) as conn:
                    have = conn.execute("SELECT count(*) FROM feedback_events").fetchone()[0]
                if have >= want:
                    break
                time.sleep(0.5)
        finally:
            relay.terminate()
            relay.wait(timeout=60)
        with sqlite3.connect(db) as conn:
            supp = [c - o for c, o in conn.execute(
                "SELECT s.created_at, e.occurred_at FROM suppressions s JOIN feedback_events e "
                "ON e.recipient = s.address AND e.kind IN ('bounce', 'complaint')")]
            lag = [r - o for r, o in conn.execute(
                "SELECT received_at, occurred_at FROM feedback_events")]
            sent = conn.execute("SELECT count(*) FROM messages WHERE sent_at IS NOT NULL"
                                ).fetchone()[0]
    return {"sent": sent, "events": len(lag), "suppressed": len(supp),
            "lag_p50": pct(lag, 0.5), "lag_p99": pct(lag, 0.99), "supp_p50": pct(supp, 0.5),
            "supp_p95": pct(supp, 0.95), "supp_max": max(supp, default=float("nan"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--receivers", type=int, default=8)
    parser.add_argument("--sends", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--skip", choices=["throughput", "e2e"], default=None)
    args = parser.parse_args()
    if args.skip != "throughput":
        print(f"{args.events} SES events in the queue at once, feedback.receivers = "
              f"{args.receivers}, SQLite")
        print(f"{'relay':<26} {'events/s':>9} {'lag p50 s':>10} {'lag p99 s':>10} "
              f"{'CPU ms/event':>12} {'relay CPU cores':>15} {'SES sends/s meanwhile':>22}")
        for name, r in throughput(args.events, args.receivers):
            print(f"{name:<26} {r['per_s']:>9.0f} {r['p50']:>10.2f} {r['p99']:>10.2f} "
                  f"{r['cpu_ms']:>12.3f} {r['cpu_share']:>15.2f} {r['smtp_sent_per_s']:>22.0f}")
        print("lag: SES event timestamp (the fill) -> applied; all N events arrive at once, "
              "so it is mostly the wait in the queue. CPU: the relay's, SMTP and delivery "
              "included when busy.")
    if args.skip != "e2e":
        r = end_to_end(args.sends, args.rate)
        print(f"\n{args.sends} messages to mailbox-simulator addresses (10% bounce, 1% "
              f"complaint), delivery.max_rate = {args.rate:g}/s, embedded sandbox "
              "(signed SNS envelopes, a Delivery per success), reputation guard off")
        print(f"{'sent':>6} {'events':>7} {'suppressed':>10} {'event->applied p50 s':>21} "
              f"{'p99 s':>6} {'event->suppression p50 s':>25} {'p95 s':>6} {'max s':>6}")
        print(f"{r['sent']:>6} {r['events']:>7} {r['suppressed']:>10} {r['lag_p50']:>21.2f} "
              f"{r['lag_p99']:>6.2f} {r['supp_p50']:>25.2f} {r['supp_p95']:>6.2f} "
              f"{r['supp_max']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
