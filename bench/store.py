"""The database's CPU per message: the delivery-time suppression check and the message log.

In-process, on SQLite in a temporary directory, with the relay's own classes from the
checkout given by --tree (default this one), so two trees can be compared:
  check xW   SuppressionList.suppressed() for one recipient, W calls at a time (as W
             deliveries ask together), 200 addresses on the list
  log Kx     one message-log transaction for K messages (a "queued" and a "sent" write
             each, as the writer commits them), of --batches such transactions
CPU is time.process_time() (every thread of the process: the loop, aiosqlite's thread,
the database thread), per message, best of --runs; wall time of the same run beside it.

    .venv/bin/python bench/store.py [--messages 2000] [--batches 200] [--runs 5] [--tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEAD = b"From: app@example.com\r\nSubject: hi\r\nMessage-ID: <%s@example.com>\r\n\r\n"


async def best(runs: int, n: int, once: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """(CPU µs, wall µs) per unit of the fastest of `runs` runs of n units."""
    cpu, wall = [], []
    for r in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        await once(r)
        cpu.append((time.process_time() - c0) * 1e6 / n)
        wall.append((time.perf_counter() - w0) * 1e6 / n)
    return min(cpu), min(wall)


async def checks(tmp: str, *, width: int, messages: int, runs: int) -> tuple[float, float]:
    from relay.store.db import Database
    from relay.store.suppression import SuppressionList

    db = await Database.open("", tmp)
    try:
        sl = SuppressionList(db)
        for i in range(200):
            await sl.add(f"gone{i}@example.org", reason="bounce")

        async def once(r: int) -> None:
            for i in range(0, messages, width):
                await asyncio.gather(*(sl.suppressed([f"rcpt{(i + j) % 500}@example.net"])
                                       for j in range(width)))

        return await best(runs, messages, once)
    finally:
        await db.close()


async def log_batches(tmp: str, *, per: int, batches: int, runs: int) -> tuple[float, float]:
    from relay.spool.record import Envelope, Record
    from relay.store.db import Database
    from relay.store.messages import MessageLog

    db = await Database.open("", tmp)
    try:
        log = MessageLog(db)
        commit = log._commit
        writes: list[Any] = []

        async def keep(batch: list[Any]) -> None:
            writes.extend(batch)

        log._commit = keep  # type: ignore[method-assign]  # gather the writes, commit below
        prepared: list[list[list[Any]]] = []
        for r in range(runs):
            prepared.append([])
            for b in range(batches):
                writes.clear()
                for k in range(per):
                    qid = f"Q{r}X{b}X{k}"
                    env = Envelope("app@example.com", (f"r{k}@example.net",), time.time())
                    await log.queued(qid, envelope=env, head=HEAD % qid.encode())
                    await log.outcome("sent", Record(id=qid, envelope=env, size=5000),
                                      list(env.recipients), ses_message_id="0100" + qid)
                prepared[r].append(list(writes))

        async def once(r: int) -> None:
            for batch in prepared[r]:
                await commit(batch)

        return await best(runs, batches * per, once)
    finally:
        await db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    import relay

    print(f"relay from {Path(relay.__file__).parent}; CPU = process_time of all threads, "
          f"best of {args.runs}")
    print(f"{'case':<12}{'CPU us/msg':>12}{'wall us/msg':>13}")
    for width in (1, 10):
        with tempfile.TemporaryDirectory() as tmp:
            cpu, wall = asyncio.run(checks(tmp, width=width, messages=args.messages,
                                           runs=args.runs))
        print(f"{f'check x{width}':<12}{cpu:>12.1f}{wall:>13.1f}")
    for per in (1, 14, 50):
        with tempfile.TemporaryDirectory() as tmp:
            cpu, wall = asyncio.run(log_batches(tmp, per=per, batches=args.batches,
                                                runs=args.runs))
        print(f"{f'log {per}x':<12}{cpu:>12.1f}{wall:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
