"""The reputation guard on a real relay and the sandbox: a bad list in the bulk lane is
paused alone after a few hundred sends while transactional mail flows; `relay resume
--lane` judges what follows on its own (a still-bad list pauses again within tens of
sends, a clean one is not paused by the old events); OnAccountSuppressionList and
transient bounces do not raise the rate. Every bound is a count of sends, never a time.
"""

from __future__ import annotations

import json
import random
import smtplib
import time
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.sandbox.server import SandboxState, SandboxThread
from tests.conftest import RelayProcess, wait_for
from tests.feedback_helpers import SENDER, cli

SIM = "simulator.amazonses.com"
BULK_HEAD = "Precedence: bulk\r\nList-Unsubscribe: <mailto:unsub@example.com>\r\n"


def message(head: str = "") -> bytes:
    return (f"From: App <{SENDER}>\r\nTo: someone@example.org\r\nSubject: hi\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n{head}\r\nbody\r\n").encode()


def send_each(port: int, rcpts: list[str], *, bulk: bool) -> None:
    """One message per recipient, in order, over one connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        for rcpt in rcpts:
            s.sendmail(SENDER, [rcpt], message(BULK_HEAD if bulk else ""))


def accepted(sb: SandboxThread, tag: str) -> int:
    """Recipients the sandbox accepted whose address carries `tag` (+b: bulk, +t: tx)."""
    return sum(1 for c in sb.state.accepted() for r in c.recipients if f"+{tag}" in r)


def get(relay: RelayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}{path}",
                                    timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def lane_metric(relay: RelayProcess, name: str, lane: str) -> float:
    for family in text_string_to_metric_families(get(relay, "/metrics")[1]):
        for s in family.samples:
            if s.name == name and s.labels.get("lane") == lane:
                return s.value
    raise AssertionError(f"no {name}{{lane={lane!r}}}")


@pytest.fixture
def fast_sandbox(tmp_path):
    sb = SandboxThread(SandboxState(outbox=tmp_path / "out", max_send_rate=2000,
                                    max_24hour_send=-1, raw_delivery=True)).start()
    yield sb
    sb.stop()


def start_guarded(start_relay, sb: SandboxThread, **feedback: object) -> RelayProcess:
    return start_relay(sb.url, delivery={"max_rate": 1000}, feedback={
        "sqs_queue_url": f"{sb.url}/queue/feedback", "sqs_endpoint_url": sb.url,
        # a sandbox in the test's process signs with a key the relay cannot know
        "raw_delivery": True,
        "wait_time": "1s", "guard_interval": "0.3s", "guard_debounce": "0.1s",
        "max_unjudged_sends": 50, **feedback})


def bad_list(n: int, bad: int, seed: int) -> list[str]:
    rcpts = [f"bounce+b{i}@{SIM}" for i in range(bad)]
    rcpts += [f"success+b{i}@{SIM}" for i in range(bad, n)]
    random.Random(seed).shuffle(rcpts)
    return rcpts


def test_a_bad_bulk_list_is_paused_alone_and_pauses_again_soon_after_resume(
        start_relay, fast_sandbox):
    sb = fast_sandbox
    # the account's own line is set apart: this is about one lane among others
    relay = start_guarded(start_relay, sb, account_max_bounce_rate=0.3)
    send_each(relay.smtp_port, bad_list(600, 48, seed=4), bulk=True)  # 8% bounce
    send_each(relay.smtp_port, [f"success+t{i}@{SIM}" for i in range(5)], bulk=False)
    paused = wait_for(lambda: relay.find("reputation_pause", lane="bulk"), 180)
    assert "lane bulk bounce rate" in paused["reason"]
    assert paused["hint"].endswith("relay resume --lane bulk")
    assert paused["sends"] <= 300, paused

    # transactional mail keeps flowing past the paused lane (and is a barrier: bulk
    # calls in flight when the pause came have ended once these went out)
    send_each(relay.smtp_port, [f"success+t{i}@{SIM}" for i in range(5, 15)], bulk=False)
    wait_for(lambda: accepted(sb, "t") == 15, 60)
    first = accepted(sb, "b")
    assert first <= 300 + 50 + 20, first  # judged + max_unjudged_sends + in flight
    assert len(relay.queued("active")) + len(relay.queued("deferred")) >= 600 - first
    status, body = get(relay, "/readyz")
    assert status == 200 and "lane bulk paused" in body, body
    assert lane_metric(relay, "relay_lane_paused", "bulk") == 1
    assert lane_metric(relay, "relay_lane_paused", "transactional") == 0
    assert lane_metric(relay, "relay_lane_bounce_ratio", "bulk") > 0.05
    assert relay.find("reputation_pause", lane="transactional") is None

    # lasting: a restart stays paused
    assert relay.stop() == 0
    relay.start()
    assert relay.find("reputation_paused", lane="bulk") is not None
    send_each(relay.smtp_port, [f"success+t{i}@{SIM}" for i in range(15, 20)], bulk=False)
    wait_for(lambda: accepted(sb, "t") == 20, 60)
    assert accepted(sb, "b") == first

    # resumed, the same list is judged on its own and pauses again within tens of sends
    assert "resumed lane bulk" in cli(relay, "resume", "--lane", "bulk").stdout
    again = wait_for(lambda: relay.find("reputation_pause", lane="bulk"), 120)
    assert again["sends"] <= 150, again
    send_each(relay.smtp_port, [f"success+t{i}@{SIM}" for i in range(20, 25)], bulk=False)
    wait_for(lambda: accepted(sb, "t") == 25, 60)
    assert accepted(sb, "b") - first <= 150 + 50 + 20, (first, accepted(sb, "b"))


def test_a_clean_list_after_a_bad_one_is_not_paused_by_the_old_events(
        start_relay, fast_sandbox):
    sb = fast_sandbox
    relay = start_guarded(start_relay, sb, account_max_bounce_rate=0.9)
    send_each(relay.smtp_port, bad_list(30, 12, seed=1), bulk=True)  # 40%
    wait_for(lambda: relay.find("reputation_pause", lane="bulk"), 120)
    # the operator drops what is left of the bad list, then resumes the lane
    left = [json.loads(line)["id"] for line in
            cli(relay, "queue", "list", "--lane", "bulk", "--json").stdout.splitlines()]
    if left:
        cli(relay, "queue", "delete", *left, "--yes")
    wrong = cli(relay, "resume", "--lane", "nope", check=False)
    assert wrong.returncode == 2 and "no lane named 'nope'" in wrong.stderr
    assert "nothing to resume" in cli(relay, "resume", "--lane", "transactional").stdout
    assert "resumed lane bulk" in cli(relay, "resume", "--lane", "bulk").stdout
    clean = [f"success+c{i}@{SIM}" for i in range(150)]
    send_each(relay.smtp_port, clean, bulk=True)
    # every clean send judged (its Delivery applied), the old bounces in the history only
    wait_for(lambda: len(relay.events("reputation_pause")) > 1
             or lane_metric(relay, "relay_lane_judged_sends", "bulk") >= 150, 120)
    assert sum(1 for c in sb.state.accepted() for r in c.recipients if "+c" in r) == 150
    assert len(relay.events("reputation_pause")) == 1
    assert lane_metric(relay, "relay_lane_paused", "bulk") == 0
    assert lane_metric(relay, "relay_lane_bounce_ratio", "bulk") == 0


def test_account_suppression_list_and_soft_bounces_do_not_raise_the_rate(
        start_relay, fast_sandbox):
    sb = fast_sandbox
    relay = start_guarded(start_relay, sb, max_unjudged_sends=0)
    rcpts = ([f"suppressionlist+b{i}@{SIM}" for i in range(30)]
             + [f"softbounce+b{i}@{SIM}" for i in range(20)]
             + [f"mailboxfull+b{i}@{SIM}" for i in range(10)]
             + [f"success+b{i}@{SIM}" for i in range(40)])
    random.Random(7).shuffle(rcpts)
    send_each(relay.smtp_port, rcpts, bulk=True)
    # judged: 40 delivered + 30 transient bounces; the 30 SES did not try are not sends
    wait_for(lambda: relay.find("reputation_pause")
             or lane_metric(relay, "relay_lane_judged_sends", "bulk") >= 70, 120)
    assert relay.find("reputation_pause") is None
    wait_for(lambda: len(relay.events("sent")) >= 100, 30)
    assert lane_metric(relay, "relay_lane_judged_sends", "bulk") == 70
    assert lane_metric(relay, "relay_lane_bounce_ratio", "bulk") == 0
    assert relay.find("reputation_pause") is None


async def test_a_check_counts_recent_sends_and_the_rest_from_the_last_full_count(tmp_path):
    """Between full counts only the sends after the last horizon are read again: new sends
    and outcomes on them count at once, a late complaint on an old send at the next full
    count, and a full count always equals the whole window's."""
    from sqlalchemy import insert, update

    from relay.config import FeedbackConfig
    from relay.config_lanes import LanesConfig
    from relay.delivery.account import Gate
    from relay.delivery.scheduler import Scheduler
    from relay.delivery.settings import PoolSettings
    from relay.feedback.guard import GuardSettings, ReputationGuard
    from relay.feedback.reputation import Counts
    from relay.spool.spool import Spool
    from relay.store.db import Database, MessageRow
    from tests.conftest import database_for

    db = await Database.open(database_for(tmp_path), tmp_path)
    now = 1_000_000.0

    def row(i: int, sent_at: float, status: str) -> dict[str, object]:
        return {"queue_id": f"q{i}", "recipient": f"r{i}@example.com", "lane": "bulk",
                "status": status, "created_at": sent_at, "updated_at": sent_at,
                "sent_at": sent_at, "attempts": 1}

    async def add(*rows: dict[str, object]) -> None:
        async with db.engine.begin() as conn:
            await conn.execute(insert(MessageRow), list(rows))

    try:
        # 10 old sends (settled), 1 bounced; 5 recent ones, unknown
        await add(*(row(i, now - 3600 + i, "bounced" if i == 0 else "delivered")
                    for i in range(10)))
        await add(*(row(i, now - 60 + i, "sent") for i in range(10, 15)))
        scheduler = Scheduler(spool=Spool(tmp_path / "spool", fsync=False), gate=Gate(),
                              settings=PoolSettings(), clock=lambda: now, lanes=LanesConfig())

        def guard(recount: float) -> ReputationGuard:
            return ReputationGuard(db=db, scheduler=scheduler, pause=lambda r: None,
                                   resume=lambda: None, paused_reason=lambda: "",
                                   settings=GuardSettings.from_config(
                                       FeedbackConfig(), recount=recount, bounce_settle=900),
                                   clock=lambda: now)

        since = {"transactional": now - 86400, "bulk": now - 86400, "*": now - 86400}
        g = guard(recount=3600)
        assert (await g.counts(since, now))["bulk"] == Counts(judged=10, bounces=1, unknown=5)
        # a new send, an outcome on a recent one, a late complaint on an old one
        await add(row(15, now - 1, "sent"))
        async with db.engine.begin() as conn:
            await conn.execute(update(MessageRow).where(MessageRow.queue_id == "q10")
                               .values(status="bounced"))
            await conn.execute(update(MessageRow).where(MessageRow.queue_id == "q5")
                               .values(status="complained"))
        assert (await g.counts(since, now))["bulk"] == Counts(judged=11, bounces=2, unknown=5)
        full = Counts(judged=11, bounces=2, complaints=1, unknown=5)
        assert (await guard(recount=0).counts(since, now))["bulk"] == full
    finally:
        await db.close()


def test_with_feedback_late_a_bad_lane_runs_only_k_sends_ahead(start_relay, tmp_path):
    """Feedback held back by the sandbox (sandbox event_delay, as SES's lag): the lane
    sends max_unjudged_sends, then waits for outcomes instead of mailing the whole list."""
    sb = SandboxThread(SandboxState(outbox=tmp_path / "out", max_send_rate=2000,
                                    max_24hour_send=-1, event_delay=3.0,
                                    raw_delivery=True)).start()
    try:
        relay = start_guarded(start_relay, sb, account_max_bounce_rate=0.9)
        send_each(relay.smtp_port, bad_list(300, 90, seed=2), bulk=True)  # 30%
        paused = wait_for(lambda: relay.find("reputation_pause", lane="bulk"), 120)
        send_each(relay.smtp_port, [f"success+t{i}@{SIM}" for i in range(5)], bulk=False)
        wait_for(lambda: accepted(sb, "t") == 5, 60)
        assert paused["sends"] <= 50
        # K unknown sends ahead of the judged ones, with those in flight or not yet in
        # the message log counted against K too (no slack for calls in flight)
        assert accepted(sb, "b") <= 50 + paused["sends"], (accepted(sb, "b"), paused)
    finally:
        sb.stop()


async def _guarded_pool(tmp_path, db, ses, *, now: float):
    """A delivery pool with SES (the sandbox) as account source and sender, and the
    reputation guard on the database, wired to each other as relay.service wires them."""
    from relay.config import FeedbackConfig
    from relay.config_lanes import LanesConfig
    from relay.delivery.account import BY_REPUTATION, Gate
    from relay.delivery.pool import DeliveryPool
    from relay.delivery.ratelimit import RateLimiter
    from relay.delivery.retry import RetryPolicy
    from relay.delivery.scheduler import Scheduler
    from relay.delivery.settings import PoolSettings
    from relay.feedback.guard import GuardSettings, ReputationGuard
    from relay.spool.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure()
    settings = PoolSettings()
    scheduler = Scheduler(spool=spool, gate=Gate(), settings=settings, clock=lambda: now,
                          lanes=LanesConfig())
    pool = DeliveryPool(spool=spool, sender=ses, accounts=ses, limiter=RateLimiter(1000.0),
                        policy=RetryPolicy(1.0, 10.0, 3600.0), settings=settings,
                        scheduler=scheduler, clock=lambda: now)
    guard = ReputationGuard(
        db=db, scheduler=scheduler, pause=lambda reason: pool.pause(reason, by=BY_REPUTATION),
        resume=lambda: pool.resume(by=BY_REPUTATION),
        paused_reason=lambda: pool.pauses.get(BY_REPUTATION, ""),
        settings=GuardSettings.from_config(FeedbackConfig(), bounce_settle=900),
        clock=lambda: now)
    return spool, pool, guard


async def _bad_sends(db, now: float) -> None:
    """200 settled sends, 40 of them bounced: over the account's line."""
    from sqlalchemy import insert

    from relay.store.db import MessageRow

    rows = [{"queue_id": f"q{i}", "recipient": f"r{i}@example.com", "lane": "transactional",
             "status": "bounced" if i < 40 else "delivered", "created_at": now - 3600,
             "updated_at": now - 3600, "sent_at": now - 3600 + i, "attempts": 1}
            for i in range(200)]
    async with db.engine.begin() as conn:
        await conn.execute(insert(MessageRow), rows)


@pytest.fixture
async def guard_parts(tmp_path):
    from relay.config import SesConfig
    from relay.ses.client import SesClient
    from relay.store.db import Database
    from tests.conftest import database_for

    sb = SandboxThread(SandboxState(outbox=tmp_path / "out", max_24hour_send=-1)).start()
    db = await Database.open(database_for(tmp_path), tmp_path)
    try:
        async with SesClient(SesConfig(), endpoint_url=sb.url,
                             static_credentials=("a", "b")) as ses:
            yield sb, db, ses
    finally:
        await db.close()
        sb.stop()


async def test_ses_enabling_sending_again_does_not_lift_the_guards_account_pause(
        tmp_path, guard_parts):
    """The guard's account pause and SES's are two: SES pausing (GetAccount) and
    enabling sending again leaves the guard's in force; only `relay resume` lifts it."""
    from relay.delivery.account import BY_REPUTATION, BY_SES
    from relay.feedback.guard import request_resume

    sb, db, ses = guard_parts
    now = time.time()
    await _bad_sends(db, now)
    _, pool, guard = await _guarded_pool(tmp_path, db, ses, now=now)
    await pool.refresh_account()
    assert not pool.paused
    assert "*" in await guard.check()
    assert pool.pauses[BY_REPUTATION].startswith("reputation: account bounce rate")

    sb.state.sending_enabled = False
    await pool.refresh_account()
    assert set(pool.pauses) == {BY_SES, BY_REPUTATION}
    assert pool.gate.closed
    sb.state.sending_enabled = True
    await pool.refresh_account()
    assert set(pool.pauses) == {BY_REPUTATION}, pool.pauses
    assert pool.paused and pool.gate.closed
    assert "*" in await guard.check()
    assert set(pool.pauses) == {BY_REPUTATION}

    # the operator's resume lifts it (and only it)
    assert "*" in await request_resume(db, now=now)
    await guard.check()
    assert not pool.paused and not pool.gate.closed


async def test_the_guards_account_pause_is_recorded_while_ses_has_paused(
        tmp_path, guard_parts):
    """SES refused a send (SendingPausedException) and paused delivery; the guard's pause
    found meanwhile is kept apart, so SES enabling sending again leaves delivery paused."""
    from relay.delivery.account import BY_REPUTATION, BY_SES
    from relay.spool.record import Envelope

    sb, db, ses = guard_parts
    now = time.time()
    spool, pool, guard = await _guarded_pool(tmp_path, db, ses, now=now)
    await pool.refresh_account()
    sb.state.sending_enabled = False
    qid = spool.accept(Envelope(SENDER, ("someone@example.net",), now), message())
    await pool.attempt.run(qid)
    assert set(pool.pauses) == {BY_SES}, pool.pauses
    assert pool.paused_reason.startswith("SES refused sending for the account")

    await _bad_sends(db, now)
    assert "*" in await guard.check()
    assert set(pool.pauses) == {BY_SES, BY_REPUTATION}, pool.pauses
    assert "SES refused" in pool.paused_reason and "reputation:" in pool.paused_reason

    sb.state.sending_enabled = True
    await pool.refresh_account()
    assert set(pool.pauses) == {BY_REPUTATION}, pool.pauses
    assert pool.gate.closed
    assert not [c for c in sb.state.accepted()]


async def test_the_allowance_counts_sends_in_flight_and_not_yet_logged(tmp_path):
    """A lane's allowance is max_unjudged_sends less what the counts see as unknown, less
    what was taken but is not a row yet: messages in flight and sends the message log
    has not committed. Without them a check could let the lane overshoot its cap."""
    from relay.config import FeedbackConfig
    from relay.config_lanes import LanesConfig
    from relay.delivery.account import Gate
    from relay.delivery.scheduler import Scheduler
    from relay.delivery.settings import PoolSettings
    from relay.feedback.guard import GuardSettings, ReputationGuard
    from relay.spool.record import Envelope
    from relay.spool.spool import Spool
    from relay.store.db import Database
    from tests.conftest import database_for

    db = await Database.open(database_for(tmp_path), tmp_path)
    now = time.time()
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        spool.ensure()
        scheduler = Scheduler(spool=spool, gate=Gate(), settings=PoolSettings(),
                              clock=lambda: now, lanes=LanesConfig())
        rcpts = tuple(f"r{i}@example.net" for i in range(4))
        qid = spool.accept(Envelope(SENDER, rcpts, now, lane="bulk"), message(BULK_HEAD))
        await scheduler.fill()
        assert scheduler.pick(time.monotonic()) == qid  # taken: in flight, 4 recipients
        unlogged = {"bulk": 3}  # sent, waiting in the message log's writer
        guard = ReputationGuard(
            db=db, scheduler=scheduler, pause=lambda r: None, resume=lambda: None,
            paused_reason=lambda: "", unlogged=lambda: dict(unlogged),
            settings=GuardSettings.from_config(FeedbackConfig(max_unjudged_sends=50)),
            clock=lambda: now)
        await guard.check()
        assert scheduler.allowance["bulk"] == 50 - 4 - 3
        # once released and committed they are rows the counts see as unknown instead
        scheduler.release(qid)
        unlogged.clear()
        await guard.check()
        assert scheduler.allowance["bulk"] == 50
    finally:
        await db.close()


async def test_the_message_log_counts_sends_until_their_rows_are_committed(tmp_path):
    from relay.spool.record import Envelope, Record
    from relay.store.db import Database
    from relay.store.messages import MessageLog
    from tests.conftest import database_for

    db = await Database.open(database_for(tmp_path), tmp_path)
    log = MessageLog(db)
    await log.start()
    try:
        record = Record(id="q1", envelope=Envelope(SENDER, ("a@example.net", "b@example.net"),
                                                   time.time(), lane="bulk"), size=10)
        await log.outcome("sent", record, ["a@example.net", "b@example.net"],
                          ses_message_id="m-1")
        await log.outcome("deferred", record, ["c@example.net"], error="throttled")
        assert log.unlogged() == {"bulk": 2}  # queued, not committed yet
        await log.flush()
        assert log.unlogged() == {}
    finally:
        await log.stop()
        await db.close()
