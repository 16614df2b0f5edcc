"""SendEmail micro-benchmark: the relay's CPU per call, aioboto3 client against the lean path.

The sandbox runs in a child process (0 ms latency, no rate limit), so time.process_time()
in this process counts only the client side. For each path and concurrency: a warm-up,
then --calls SendEmail calls of a --size byte message; prints CPU microseconds per call
(process_time: user + system, the kernel's loopback work included; and user alone) and
calls/s. Both paths are relay.ses.SesClient: send_raw (lean) and the aioboto3 client it
keeps for the rare calls (_call("send_email", ...)).

    .venv/bin/python bench/ses_call.py [--calls 3000] [--concurrency 1,20] [--size 5120]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.config import SesConfig  # noqa: E402
from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402
from relay.ses.client import SesClient  # noqa: E402


def serve(conn: Any) -> None:
    """Child process: a sandbox with no latency and no limits, until told to stop."""
    state = SandboxState(max_send_rate=1e9, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        conn.send(sb.url)
        conn.recv()


async def measure(call: Callable[[], Awaitable[Any]], calls: int,
                  concurrency: int) -> tuple[float, float, float]:
    """(CPU and user-mode CPU microseconds per call, calls per second) for `calls` calls,
    `concurrency` at once."""
    left = [calls]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up: connections, caches
    left[0] = calls
    cpu, user, wall = time.process_time(), os.times().user, time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, user = time.process_time() - cpu, os.times().user - user
    return cpu * 1e6 / calls, user * 1e6 / calls, calls / (time.perf_counter() - wall)


async def run(url: str, args: argparse.Namespace) -> None:
    raw = (b"From: bench@example.com\r\nTo: r@example.net\r\nSubject: bench\r\n\r\n"
           + b"x" * args.size + b"\r\n")
    async with SesClient(SesConfig(), endpoint_url=url, max_connections=100,
                         static_credentials=("bench", "bench")) as ses:
        paths: dict[str, Callable[[], Awaitable[Any]]] = {
            "aioboto3": lambda: ses._call("send_email", {
                "FromEmailAddress": "bench@example.com",
                "Destination": {"ToAddresses": ["r@example.net"]},
                "Content": {"Raw": {"Data": raw}}}),
            "lean": lambda: ses.send_raw(sender="bench@example.com",
                                         recipients=["r@example.net"], raw=raw),
        }
        print(f"{'path':>9} {'conc':>5} {'calls':>6} {'CPU us/call':>11} {'(user)':>7} "
              f"{'calls/s':>8}  (median of {args.repeat})")
        for conc in (int(c) for c in args.concurrency.split(",")):
            for name, call in paths.items():
                runs = [await measure(call, args.calls, conc) for _ in range(args.repeat)]
                cpu, user, rate = (statistics.median(r[i] for r in runs) for i in range(3))
                print(f"{name:>9} {conc:>5} {args.calls:>6} {cpu:>11.0f} {user:>7.0f} "
                      f"{rate:>8.0f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,20")
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=serve, args=(child,), daemon=True)
    proc.start()
    try:
        asyncio.run(run(parent.recv(), args))
    finally:
        parent.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
