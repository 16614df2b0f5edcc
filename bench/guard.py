"""What one reputation guard check costs on a large message log: prints a table.

Fills a fresh database (SQLite in a temporary directory, or --database-url) with N
message rows sent over the last day in two lanes (8% bounced in bulk, the rest delivered,
some still unknown), then times ReputationGuard.check() (the grouped query over the
(sent_at, lane, status) index and the verdicts) several times, with and without a resumed
lane (a second, shorter range). Wall-clock and process CPU per check.

    .venv/bin/python bench/guard.py --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, text  # noqa: E402

from relay.config_lanes import LanesConfig  # noqa: E402
from relay.delivery.account import Gate  # noqa: E402
from relay.delivery.scheduler import Scheduler  # noqa: E402
from relay.delivery.settings import PoolSettings  # noqa: E402
from relay.feedback.guard import ReputationGuard, request_resume  # noqa: E402
from relay.spool.spool import Spool  # noqa: E402
from relay.store.db import Database, MessageRow  # noqa: E402

BATCH = 20000


def rows(n: int, now: float, start: int) -> list[dict[str, object]]:
    rnd = random.Random(start)
    out = []
    for i in range(start, start + n):
        bulk = i % 3 == 0
        sent = now - 86000 * (1 - i / max(n, 1)) if n else now
        r = rnd.random()
        status = ("bounced" if bulk and r < 0.08 else "sent" if r > 0.995
                  else "complained" if r < 0.0005 else "delivered")
        out.append({"queue_id": f"{i:018x}", "recipient": f"r{i}@example.com",
                    "status": status, "lane": "bulk" if bulk else "transactional",
                    "created_at": sent, "updated_at": sent, "sent_at": sent,
                    "ses_message_id": f"m{i}", "attempts": 1})
    return out


async def fill(db: Database, n: int, now: float) -> float:
    started = time.monotonic()
    for start in range(0, n, BATCH):
        part = rows(min(BATCH, n - start), now, start)
        for row in part:  # spread over the day in order
            row["sent_at"] = row["created_at"] = row["updated_at"] = (
                now - 86000 + 86000 * int(str(row["queue_id"]), 16) / n)
        async with db.engine.begin() as conn:
            await conn.execute(insert(MessageRow), part)
    return time.monotonic() - started


async def timed(guard: ReputationGuard, runs: int) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each of `runs` checks in a row."""
    out = []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        await guard.check()
        out.append((time.perf_counter() - w, time.process_time() - c))
    return out


def show(dialect: str, n: int, case: str, times: list[tuple[float, float]]) -> None:
    """The first check (a full count of the window) and the median of the later ones
    (the sends since the full count's horizon)."""
    (wall, cpu), rest = times[0], times[1:]
    print(f"{dialect:10} {n:>9} {case + ': first':30} {wall * 1000:>8.1f} {cpu * 1000:>7.1f}")
    if rest:
        wall = statistics.median(t[0] for t in rest)
        cpu = statistics.median(t[1] for t in rest)
        print(f"{dialect:10} {n:>9} {case + ': later':30} {wall * 1000:>8.1f} "
              f"{cpu * 1000:>7.1f}")


async def main(args: argparse.Namespace) -> None:
    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(args.database_url, tmp)
        now = time.time()
        took = await fill(db, args.rows, now)
        if db.engine.dialect.name == "sqlite":
            async with db.engine.begin() as conn:
                await conn.execute(text("ANALYZE"))
        spool = Spool(Path(tmp) / "spool", fsync=False)
        scheduler = Scheduler(spool=spool, gate=Gate(), settings=PoolSettings(),
                              clock=time.time, lanes=LanesConfig())
        reason = ""
        guard = ReputationGuard(db=db, scheduler=scheduler,
                                pause=lambda r: None, resume=lambda: None,
                                paused_reason=lambda: reason)
        dialect = db.engine.dialect.name
        print(f"{'database':10} {'rows':>9} {'check':30} {'wall ms':>8} {'cpu ms':>7}")
        show(dialect, args.rows, "window", await timed(guard, args.runs))
        c = guard.scopes["bulk"].counts
        print(f"-- bulk judged {c.judged} bounces {c.bounces} unknown {c.unknown}; paused: "
              f"{sorted(s for s, i in guard.scopes.items() if i.paused)}")
        await request_resume(db)  # the lane paused by the 8% above starts a new epoch
        show(dialect, args.rows, "a lane resumed", await timed(guard, args.runs))
        print(f"-- {args.rows} rows filled in {took:.1f}s")
        await db.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--database-url", default="")
    asyncio.run(main(p.parse_args()))
