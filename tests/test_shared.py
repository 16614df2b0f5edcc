"""Several relays on one PostgreSQL database: one rate budget, one suppression list, one
schema migrated once. The relay tests need the PostgreSQL pass (tests/run.sh)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.sandbox.server import SandboxState, SandboxThread
from relay.store.budget import SPAN, SharedBudget, first_fit, slot_of
from relay.store.db import Database
from tests.conftest import (
    PG_SERVER,
    ROOT,
    RelayProcess,
    database_for,
    relay_sections,
    wait_for,
    write_config,
)
from tests.feedback_helpers import cli, log_lines, send, statuses, suppressed
from tests.test_delivery import msg, send_many, spool_empty

needs_pg = pytest.mark.skipif(not PG_SERVER, reason="needs the PostgreSQL pass (tests/run.sh)")


def most_in_a_second(stamps: list[float]) -> int:
    stamps, best, lo = sorted(stamps), 0, 0
    for hi in range(len(stamps)):
        while stamps[hi] - stamps[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize("granted,start,n,want,rate,expect", [
    ({}, 100, 1, 6, 60, (100, 6)),
    ({100: 58}, 100, 1, 6, 60, (100, 2)),
    ({100: 58}, 100, 3, 6, 60, (111, 6)),      # the window holding slot 100 is full
    ({95: 60}, 100, 1, 6, 60, (106, 6)),       # slots 95..105 are one window
    ({90 + i: 6 for i in range(10)}, 100, 1, 1, 60, (101, 1)),  # slot 90 leaves the window
    ({s: 60 for s in range(60, 200)}, 100, 1, 6, 60, None),
])
def test_first_fit_keeps_every_eleven_slots_within_the_rate(granted, start, n, want, rate, expect):
    assert first_fit(granted, start=start, n=n, want=want, rate=rate) == expect
    if expect is not None:
        after = dict(granted)
        after[expect[0]] = after.get(expect[0], 0) + expect[1]
        assert all(sum(after.get(j + i, 0) for i in range(SPAN)) <= rate
                   for j in range(expect[0] - SPAN, expect[0] + 1))


def test_a_one_second_window_touches_at_most_eleven_slots():
    for a in (0.0, 0.05, 0.0999, 12.34):
        touched = {slot_of(a + k / 1000) for k in range(1000)}
        assert len(touched) <= SPAN


@needs_pg
async def test_two_budgets_on_one_database_never_exceed_the_rate_together(tmp_path):
    url = database_for(tmp_path)
    dbs = [await Database.open(url, tmp_path / str(i)) for i in range(2)]
    stamps: list[float] = []

    async def relay(budget: SharedBudget, count: int) -> None:
        for _ in range(count):
            await budget.take(1, rate=20)
            stamps.append(time.time())  # no await between the grant and the departure

    try:
        budgets = [SharedBudget(db) for db in dbs]
        await asyncio.gather(*(relay(b, 15) for b in budgets for _ in range(2)))
    finally:
        for db in dbs:
            await db.close()
    assert len(stamps) == 60
    assert most_in_a_second(stamps) <= 20


@needs_pg
async def test_without_the_database_the_budget_waits_instead_of_granting(tmp_path):
    from sqlalchemy.ext.asyncio import create_async_engine

    from relay.store.db import database_url

    name = f"late_{os.getpid()}_{tmp_path.name}"[:60]
    url = PG_SERVER.rsplit("/", 1)[0] + "/" + name  # not created yet
    waiting = Database(create_async_engine(database_url(url, tmp_path)))
    budget = SharedBudget(waiting)
    task = asyncio.create_task(budget.take(1, rate=10))
    try:
        for _ in range(200):
            if budget.unavailable or task.done():
                break
            await asyncio.sleep(0.1)
        assert budget.unavailable and not task.done()
        out = subprocess.run(["psql", PG_SERVER, "-q", "-c", f'CREATE DATABASE "{name}"'],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        await (await Database.open(url, tmp_path)).close()
        await asyncio.wait_for(task, 30)
        # one lease, or more when this busy machine let a leased slot pass before its use
        assert not budget.unavailable and budget.leases >= 1
    finally:
        task.cancel()
        await waiting.close()


@needs_pg
def test_relays_starting_together_migrate_a_fresh_database_once(tmp_path):
    config = write_config(tmp_path / "relay.toml", relay_sections(tmp_path, "sandbox"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "relay", "suppression", "list", "--json", "-c", str(config)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert all(out.strip() == "[]" for out, _ in outs)


def start_relays(tmp_path: Path, endpoint: str, count: int,
                 feedback: dict[str, str] | None = None) -> list[RelayProcess]:
    """`count` relays, each with its own spool, on one database; the first two poll
    `feedback` when given."""
    shared = database_for(tmp_path)
    relays = []
    for i in range(count):
        work = tmp_path / f"relay{i}"
        work.mkdir()
        sections = relay_sections(work, endpoint)
        sections["database"] = {"url": shared}
        if feedback and i < 2:
            sections["feedback"] = feedback
        relays.append(RelayProcess(work, sections))
    try:
        for r in relays:
            r.start()
    except BaseException:
        for r in relays:
            r.kill()
        raise
    return relays


@needs_pg
def test_three_relays_share_a_rate_of_60(tmp_path):
    state = SandboxState(max_send_rate=60, max_24hour_send=-1, latency=0.05, keep_raw=False)
    with SandboxThread(state) as sb:
        relays = start_relays(tmp_path, sb.url, 3)
        try:
            assert all(r.find("rate_shared") for r in relays)
            # queue everything first (SES paused), then let all three drain at once
            state.sending_enabled = False
            threads = []
            for k, r in enumerate(relays):
                batch = [([f"r{i}@example.net"], msg(i, [f"r{i}@example.net"]))
                         for i in range(k * 600, (k + 1) * 600)]
                threads.append(threading.Thread(target=send_many, args=(r.smtp_port, batch)))
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert sum(len(r.queued("active")) + len(r.queued("deferred")) for r in relays) == 1800
            wait_for(lambda: all(r.find("paused") for r in relays), 20)
            state.sending_enabled = True
            wait_for(lambda: state.recipients_sent() >= 1800, 240, 0.2)
            wait_for(lambda: all(spool_empty(r) for r in relays), 30)
        finally:
            for r in relays:
                r.stop()
    assert state.throttles == 0
    assert state.max_window(1.0) <= 60
    delivered = sorted(rc for c in state.accepted() for rc in c.recipients)
    assert delivered == sorted(f"r{i}@example.net" for i in range(1800))
    # each relay sent its own 600
    assert [sum(len(e["recipients"]) for e in r.events("sent")) for r in relays] == [600] * 3


@needs_pg
def test_suppression_added_through_one_relay_stops_delivery_on_the_others(tmp_path):
    state = SandboxState(max_send_rate=100, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        relays = start_relays(tmp_path, sb.url, 3)
        try:
            out = cli(relays[0], "suppression", "add", "Gone@Example.net")
            assert "added" in out.stdout
            assert "gone@example.net" in suppressed(relays[2])
            qids = {}
            for r in relays[1:]:
                qids[r.config] = send(r.smtp_port, ["gone@example.net", "here@example.net"])
            wait_for(lambda: all(spool_empty(r) for r in relays), 30)
            wait_for(lambda: all(statuses(r, "gone@example.net").get(qids[r.config]) ==
                                 "suppressed" for r in relays[1:]), 20)
        finally:
            for r in relays:
                r.stop()
    delivered = [rc for c in state.accepted() for rc in c.recipients]
    assert "gone@example.net" not in delivered
    assert delivered.count("here@example.net") == 2


def test_sidecar_config_loads_and_shares_one_database():
    from relay import config

    cfg = config.load(ROOT / "conf" / "sidecar.toml", env={})
    assert cfg.database.url.startswith("postgresql://")
    assert cfg.database.shared_rate and cfg.delivery.max_rate == 0
    assert cfg.smtp.allowed_networks == ("127.0.0.0/8", "::1/128")


@needs_pg
def test_feedback_read_by_any_relay_is_seen_by_all(tmp_path):
    sim = "simulator.amazonses.com"
    bounce, ok = f"bounce@{sim}", f"success@{sim}"
    state = SandboxState(max_send_rate=100, max_24hour_send=-1, keep_raw=False,
                         raw_delivery=True)
    with SandboxThread(state) as sb:
        relays = start_relays(tmp_path, sb.url, 3, feedback={
            "sqs_queue_url": f"{sb.url}/queue/feedback", "sqs_endpoint_url": sb.url,
            "raw_delivery": True,
            "wait_time": "1s"})
        try:
            # relays 0 and 1 both poll the queue; relay 2 polls nothing
            assert relays[2].find("listening")
            qid = send(relays[2].smtp_port, [bounce, ok])
            wait_for(lambda: bounce in suppressed(relays[2]), 30)
            wait_for(lambda: statuses(relays[2], ok).get(qid) == "delivered", 30)
            assert statuses(relays[2], bounce)[qid] == "bounced"
            events = [x for x in log_lines(relays[0], bounce) if x["kind"] == "event"]
            assert [x["status"] for x in events] == ["bounce"]
            # and the bounce stops delivery through a relay that never saw it
            again = send(relays[1].smtp_port, [bounce])
            wait_for(lambda: statuses(relays[1], bounce).get(again) == "suppressed", 30)
        finally:
            for r in relays:
                r.stop()
    delivered = [rc for c in state.accepted() for rc in c.recipients]
    assert delivered.count(bounce) == 1 and delivered.count(ok) == 1
