"""One delivery attempt, in process: every outcome against a fake sender, row by row.

A real spool on tmp_path and a real group commit, the pool's own wiring (gate, account
watch, outcomes, attempt), and a Sender that is a plain object answering from a script.
Each row says which recipients the sender got, where the message is afterwards, and
what its record says. The subprocess tests (tests/test_delivery.py) cover the same
outcomes end to end through the sandbox.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.delivery.pool import DeliveryPool
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.delivery.settings import PoolSettings
from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    PermanentError,
    QuotaExceededError,
    ThrottledError,
    TransientError,
)
from relay.spool.commit import GroupCommit
from relay.spool.record import Envelope, Record, State
from relay.spool.spool import Spool

NOW = 1_000_000.0
POLICY = RetryPolicy(min_backoff=300.0, max_backoff=4000.0, max_lifetime=86400.0)
SETTINGS = PoolSettings(throttle_retry=7.0, account_refresh=600.0)
RAW = b"From: app@example.com\r\nSubject: t\r\n\r\nbody\r\n"
MANY = [f"r{i:03d}@example.net" for i in range(120)]
ONE = ["one@example.net"]
GONE = None  # the message left the spool: delivered (or nothing left to send)


class FakeSender:
    """The Sender port: answers each call from a script (a MessageId, or an error)."""

    def __init__(self, answers: Sequence[str | Exception]) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    async def send_raw(self, *, sender: str, recipients: Sequence[str], raw: bytes,
                       options: object = None) -> str:
        assert raw == RAW
        self.calls.append(list(recipients))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class NoAccount:
    async def get_account(self) -> Any:
        raise AssertionError("the attempt never reads the account")


class Suppressed:
    def __init__(self, addresses: set[str], *, down: bool = False) -> None:
        self.addresses = addresses
        self.down = down

    async def suppressed(self, recipients: Sequence[str]) -> set[str]:
        if self.down:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        return self.addresses & set(recipients)


class Told:
    """A listener: every outcome, with a copy of the record as it was told."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.last: Record | None = None

    async def outcome(self, kind: str, record: Record, recipients: Sequence[str], *,
                      ses_message_id: str = "", error: str = "") -> None:
        self.kinds.append(kind)
        self.last = Record.from_json(record.to_json())


@dataclass
class Row:
    name: str
    recipients: list[str]
    answers: list[str | Exception]
    #: recipient lists of the calls the sender got
    calls: list[list[str]]
    #: where the message is afterwards (GONE: nowhere)
    state: State | None
    #: recipient -> status in the record afterwards (pending ones absent)
    results: dict[str, str]
    told: list[str]
    last_error: str = ""
    attempts: int = 0
    #: seconds from now to the next attempt, for a deferred message; None: the backoff
    wait: float | None = None
    suppressed: set[str] = field(default_factory=set)
    age: float = 10.0
    #: the 24-hour quota left before the attempt (None: unlimited)
    quota: float | None = None
    paused: bool = False
    #: the suppression list's database cannot answer
    database_down: bool = False
    dsn: bool = False
    check: Callable[[DeliveryPool], None] | None = None


def sent(rcpts: Sequence[str]) -> dict[str, str]:
    return dict.fromkeys(rcpts, "sent")


def status(rcpts: Sequence[str], value: str) -> dict[str, str]:
    return dict.fromkeys(rcpts, value)


def rate_lowered(pool: DeliveryPool) -> None:
    assert pool.limiter.rate(time.monotonic()) < pool.limiter.configured


def rate_kept_and_quota_exhausted(pool: DeliveryPool) -> None:
    assert pool.limiter.rate(time.monotonic()) == pool.limiter.configured
    assert pool.quota.remaining == 0


def delivery_held_for_the_database(pool: DeliveryPool) -> None:
    assert pool.holds and pool.holds[0].startswith("suppression list unreachable")
    assert pool.gate.closed


THROTTLE = ThrottledError("TooManyRequestsException", "Maximum sending rate exceeded.")
DAILY = QuotaExceededError("ThrottlingException", "Daily message quota exceeded.")
FAULT = TransientError("InternalFailure", "An internal error occurred.")
REJECTED = PermanentError("MessageRejected", "Email address is not verified.")
MAILFROM = ConfigurationError("MailFromDomainNotVerifiedException", "not verified")
PAUSED = AccountPausedError("SendingPausedException", "Sending is paused for this account.")

ROWS = [
    Row("sent", ONE, ["m-1"], [ONE], GONE, sent(ONE), ["sent"]),
    Row("sent in calls of 50", MANY, ["m-1", "m-2", "m-3"],
        [MANY[:50], MANY[50:100], MANY[100:]], GONE, sent(MANY), ["sent"] * 3),
    Row("partial: the second call fails, the first 50 stay sent", MANY, ["m-1", FAULT],
        [MANY[:50], MANY[50:100]], State.DEFERRED, sent(MANY[:50]), ["sent", "deferred"],
        last_error=str(FAULT), attempts=1),
    Row("partial: the second call is rejected, the rest go on", MANY, ["m-1", REJECTED, "m-3"],
        [MANY[:50], MANY[50:100], MANY[100:]], State.FAILED,
        sent(MANY[:50]) | status(MANY[50:100], "failed") | sent(MANY[100:]),
        ["sent", "rejected", "sent", "failed"], last_error=str(REJECTED), dsn=True),
    Row("throttled", ONE, [THROTTLE], [ONE], State.DEFERRED, {}, ["throttled", "deferred"],
        last_error=str(THROTTLE), wait=SETTINGS.throttle_retry, check=rate_lowered),
    Row("transient", ONE, [FAULT], [ONE], State.DEFERRED, {}, ["deferred"],
        last_error=str(FAULT), attempts=1),
    Row("permanent", ONE, [REJECTED], [ONE], State.FAILED, status(ONE, "failed"),
        ["rejected", "failed"], last_error=str(REJECTED), dsn=True),
    Row("configuration: held", ONE, [MAILFROM], [ONE], State.HOLD, {}, ["held"],
        last_error=str(MAILFROM)),
    Row("account paused: the pool pauses, the mail stays", ONE, [PAUSED], [ONE],
        State.ACTIVE, {}, [], last_error=str(PAUSED), paused=True),
    Row("daily quota answered by SES", ONE, [DAILY], [ONE], State.DEFERRED, {}, ["deferred"],
        last_error=str(DAILY), wait=SETTINGS.account_refresh,
        check=rate_kept_and_quota_exhausted),
    Row("24-hour quota used up before the call", ONE, [], [], State.DEFERRED, {},
        ["deferred"], last_error="24-hour sending quota used up",
        wait=SETTINGS.account_refresh, quota=0),
    Row("quota for 60 of 120: 50 and 10 sent, the rest wait", MANY, ["m-1", "m-2"],
        [MANY[:50], MANY[50:60]], State.DEFERRED, sent(MANY[:60]),
        ["sent", "sent", "deferred"], last_error="24-hour sending quota used up",
        wait=SETTINGS.account_refresh, quota=60),
    Row("suppressed: only the others are sent", ["s@example.net", *ONE], ["m-1"], [ONE],
        GONE, {"s@example.net": "suppressed"} | sent(ONE), ["suppressed", "sent"],
        suppressed={"s@example.net"}),
    Row("every recipient suppressed: no call", ONE, [], [], GONE, status(ONE, "suppressed"),
        ["suppressed"], suppressed=set(ONE)),
    Row("database down: nothing sent, no attempt counted, delivery held", ONE, [], [],
        State.ACTIVE, {}, [], database_down=True, check=delivery_held_for_the_database),
    Row("expired", ONE, [], [], State.FAILED, status(ONE, "failed"), ["failed"],
        last_error="expired: no attempt succeeded", age=POLICY.max_lifetime, dsn=True),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_each_outcome_leaves_the_spool_and_the_record_as_it_should(
        row: Row, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=True)
    spool.ensure()
    qid = spool.accept(Envelope("app@example.com", tuple(row.recipients), NOW - row.age), RAW)
    sender, told, dsn = FakeSender(row.answers), Told(), []

    async def on_failed(record: Record, reason: str) -> None:
        dsn.append((record.id, reason))

    pool = DeliveryPool(spool=spool, sender=sender, accounts=NoAccount(),
                        limiter=RateLimiter(10_000.0), policy=POLICY, settings=SETTINGS,
                        suppressions=Suppressed(row.suppressed, down=row.database_down),
                        listeners=[told],
                        on_failed=on_failed, commit=GroupCommit(spool), clock=lambda: NOW)
    if row.quota is not None:
        pool.quota.update(row.quota, 0)

    await pool.attempt.run(qid)

    assert sender.calls == row.calls
    assert told.kinds == row.told
    assert spool.locate(qid) == row.state
    if row.state is GONE:
        assert not list(spool.scan(State.INCOMING))  # no half-removed leftovers
        record = told.last
    else:
        record = spool.load(row.state, qid)
    assert record is not None and record.id == qid
    assert {r: res["status"] for r, res in record.results.items()} == row.results
    assert record.last_error == row.last_error
    assert record.attempts == row.attempts
    assert pool.paused is row.paused
    assert dsn == ([(qid, row.last_error)] if row.dsn else [])
    if row.state is State.DEFERRED:
        # the next attempt is the deferred message's mtime (a scan reads no file)
        mtime = os.stat(spool.path(State.DEFERRED, qid)).st_mtime
        assert mtime == pytest.approx(record.next_attempt, abs=1e-3)
        if row.wait is not None:
            assert record.next_attempt == NOW + row.wait
        else:
            assert NOW + POLICY.min_backoff <= record.next_attempt <= NOW + POLICY.ceiling(1)
    if row.paused:
        assert pool.paused_reason.startswith("SES refused sending for the account")
    if row.check is not None:
        row.check(pool)


async def test_a_database_outage_is_one_log_line_not_one_per_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure()
    qids = [spool.accept(Envelope("app@example.com", tuple(ONE), NOW), RAW) for _ in range(5)]
    sender = FakeSender([])
    pool = DeliveryPool(spool=spool, sender=sender, accounts=NoAccount(),
                        limiter=RateLimiter(10_000.0), policy=POLICY, settings=SETTINGS,
                        suppressions=Suppressed(set(), down=True), clock=lambda: NOW)
    with caplog.at_level("INFO", logger="relay.delivery"):
        for qid in qids:
            await pool.attempt.run(qid)
    lines = [r for r in caplog.records if r.name == "relay.delivery"]
    assert len(lines) == 1 and "suppression_check_failed" in lines[0].getMessage()
    assert lines[0].exc_info is None  # a reason, not a traceback
    assert sender.calls == []
    assert sorted(spool.scan(State.ACTIVE)) == sorted(qids)  # untouched, attempts 0
    assert all(spool.load(State.ACTIVE, q).attempts == 0 for q in qids)
