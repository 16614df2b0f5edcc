"""Console benchmark: how fast each console page answers on a big spool.

Builds a spool of --messages messages through the relay's own spool API in this process
(no fsync: a fixture, not a durability test), almost all deferred a day ahead and a few
held or failed, so the relay sends none of them; one message-log row per message, some
feedback events and --suppressions suppressions in the relay's SQLite database; and a
sandbox outbox of --sandbox-mail messages. Then starts `relay serve` on the embedded
sandbox with its admin listener on 127.0.0.1 and times each page with urllib over --runs
runs (after two warm-up requests), printing median and p95 in milliseconds. Target: every
page under 200 ms at 100,000 messages.

    .venv/bin/python bench/console.py [--messages 100000] [--runs 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from common import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.spool.record import Envelope, State  # noqa: E402
from relay.spool.spool import Spool  # noqa: E402

DOMAINS = 50
ADDRESSES = 5000
BODY = ("Subject: invoice {n}\r\nFrom: Billing <billing@example.com>\r\n"
        "To: <{rcpt}>\r\nMessage-ID: <{n}.bench@example.com>\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n" + "line of text\r\n" * 150)


def rcpt(n: int) -> str:
    return f"user{n % ADDRESSES}@example{n % DOMAINS}.net"


def build_spool(root: Path, messages: int) -> tuple[list[str], float]:
    """Messages straight into deferred/ (a day ahead), hold/ and failed/; their ids."""
    spool = Spool(root, fsync=False)
    spool.ensure()
    later = time.time() + 86400
    ids = []
    started = time.perf_counter()
    for n in range(messages):
        to = rcpt(n)
        env = Envelope(sender="billing@example.com", recipients=(to,),
                       received_at=time.time(), client="127.0.0.1", helo="app.example")
        qid = spool.prepare(env, BODY.format(n=n, rcpt=to).encode())
        if n % 100 == 1:
            dst, when = State.HOLD, None
        elif n % 100 == 2:
            dst, when = State.FAILED, None
        else:
            dst, when = State.DEFERRED, later
        if n % 10 == 3 or dst is State.FAILED:
            record = spool.load(State.INCOMING, qid)
            record.attempts = 1
            record.next_attempt = later
            record.last_error = f"InternalFailure: An internal error occurred ({n % 7})"
            spool.save(State.INCOMING, record, durable=False)
        spool.move(qid, State.INCOMING, dst, when=when, durable=False)
        ids.append(qid)
    os.sync()
    return ids, time.perf_counter() - started


async def fill_database(spool_dir: Path, ids: list[str], suppressions: int) -> None:
    """Message-log rows (one per message), bounce events and suppressions."""
    from sqlalchemy import insert

    from relay.store.db import Database, FeedbackEvent, MessageRow, Suppression

    db = await Database.open("", spool_dir)
    now = time.time()
    try:
        async with db.engine.begin() as conn:
            rows = [{"queue_id": qid, "recipient": rcpt(n),
                     "message_id_header": f"<{n}.bench@example.com>",
                     "ses_message_id": f"bench-{n:08d}" if n % 10 == 0 else "",
                     "status": "delivered" if n % 10 == 0 else "queued", "attempts": 0,
                     "last_error": "", "created_at": now - n, "updated_at": now - n,
                     "sent_at": None} for n, qid in enumerate(ids)]
            for i in range(0, len(rows), 5000):
                await conn.execute(insert(MessageRow), rows[i:i + 5000])
            events = [{"event_key": uuid.uuid4().hex, "recipient": rcpt(n * 10),
                       "kind": "bounce", "ses_message_id": f"bench-{n * 10:08d}",
                       "detail": "Permanent/General", "occurred_at": now - n,
                       "received_at": now - n} for n in range(min(2000, len(ids) // 10))]
            if events:
                await conn.execute(insert(FeedbackEvent), events)
            supp = [{"address": f"gone{n}@example{n % DOMAINS}.org", "reason": "bounce",
                     "source": "feedback", "detail": "Permanent/General",
                     "created_at": now - n, "updated_at": now - n}
                    for n in range(suppressions)]
            for i in range(0, len(supp), 5000):
                await conn.execute(insert(Suppression), supp[i:i + 5000])
    finally:
        await db.close()


def fill_outbox(outbox: Path, count: int) -> None:
    """Messages as the embedded sandbox writes them: <SES MessageId>.eml, newest last."""
    outbox.mkdir(parents=True, exist_ok=True)
    base = int(time.time() * 1000) - count
    for n in range(count):
        mid = f"{base + n:016x}-{uuid.uuid4()}-000000"
        (outbox / f"{mid}.eml").write_bytes(BODY.format(n=n, rcpt=rcpt(n)).encode())


def start_relay(work: Path, spool_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = work / "relay.toml"
    config.write_text(
        f'[smtp]\nhost = "127.0.0.1"\nport = 0\nworkers = 1\n'
        f'[spool]\ndir = "{spool_dir}"\nmin_free_bytes = 0\n'
        f'[ses]\nendpoint_url = "sandbox"\nregion = "us-east-1"\n'
        f'[sandbox]\ndir = "{work / "outbox"}"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {port}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT)
    log = open(work / "relay.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)],
                            cwd=work, env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("relay exited:\n" + (work / "relay.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("relay did not answer /healthz in 300 s")


def fetch(url: str) -> tuple[int, int, float]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            status, size = r.status, len(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            status, size = exc.code, len(exc.read())
    return status, size, (time.perf_counter() - started) * 1000


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--suppressions", type=int, default=10_000)
    ap.add_argument("--sandbox-mail", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keep", default="", help="build in this directory and keep it")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="relay-console-"))
    work.mkdir(parents=True, exist_ok=True)
    spool_dir = work / "spool"
    try:
        ids, took = build_spool(spool_dir, args.messages)
        print(f"spool: {len(ids)} messages in {took:.1f} s", file=sys.stderr)
        asyncio.run(fill_database(spool_dir, ids, args.suppressions))
        fill_outbox(work / "outbox", args.sandbox_mail)
        proc, port = start_relay(work, spool_dir)
        try:
            base = f"http://127.0.0.1:{port}"
            sample = ids[len(ids) // 2]
            pages = [
                ("overview", "/"),
                ("queue, first page", "/queue"),
                ("queue, page 501", "/queue?" + urllib.parse.urlencode(
                    {"after": sorted(ids)[len(ids) // 2]})),
                ("queue, filtered", "/queue?" + urllib.parse.urlencode(
                    {"state": "deferred", "domain": "example3.net", "error": "InternalFailure"})),
                ("queue, filter no hit", "/queue?" + urllib.parse.urlencode(
                    {"state": "deferred", "domain": "example7.net", "error": "InternalFailure"})),
                ("message", f"/queue/{sample}"),
                ("log search", "/log?" + urllib.parse.urlencode({"q": rcpt(42)})),
                ("timeline", f"/log/{sample}"),
                ("suppressions", "/suppressions"),
                ("suppressions search", "/suppressions?q=gone42%40example42.org"),
                ("sandbox list", "/sandbox"),
            ]
            print(f"console pages, {len(ids)} messages, {args.runs} runs each "
                  f"(milliseconds, urllib on 127.0.0.1)")
            print(f"{'page':22} {'status':>6} {'bytes':>8} {'median':>8} {'p95':>8}  path")
            for name, path in pages:
                for _ in range(2):
                    fetch(base + path)
                times, status, size = [], 0, 0
                for _ in range(args.runs):
                    status, size, ms = fetch(base + path)
                    times.append(ms)
                mark = "" if p95(times) < 200 else "  > 200 ms"
                print(f"{name:22} {status:>6} {size:>8} {statistics.median(times):>8.1f} "
                      f"{p95(times):>8.1f}  {path[:60]}{mark}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
