"""The message log's writer and the readiness verdicts: which database errors are retried,
how long it waits, what it holds past its bound, and when SES counts as not answering."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import exc as sa_exc

from relay.ops.readiness import ses_verdict
from relay.store.log_writer import BatchWriter, retry_delay, retryable


def wrapped(cls: type[sa_exc.DBAPIError], text: str) -> sa_exc.DBAPIError:
    return cls("INSERT ...", {}, sqlite3.OperationalError(text))


@pytest.mark.parametrize("error, retry", [
    (wrapped(sa_exc.OperationalError, "database is locked"), True),
    (wrapped(sa_exc.OperationalError, "attempt to write a readonly database"), True),
    (wrapped(sa_exc.DBAPIError, "terminating connection due to administrator command"), True),
    (wrapped(sa_exc.InterfaceError, "connection is closed"), True),
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError(), True),
    (wrapped(sa_exc.IntegrityError, "UNIQUE constraint failed"), False),
    (wrapped(sa_exc.DataError, "value too long"), False),
    (wrapped(sa_exc.ProgrammingError, "no such table: messages"), False),
    (TypeError("a bug"), False),
])
def test_only_errors_the_database_can_get_over_are_retried(error, retry):
    assert retryable(error) is retry


@pytest.mark.parametrize("failures, delay", [(1, 0.05), (2, 0.1), (3, 0.2), (6, 1.6),
                                             (7, 2.0), (100, 2.0)])
def test_retries_back_off_to_two_seconds(failures, delay):
    assert retry_delay(failures) == pytest.approx(delay)


@pytest.mark.parametrize("outcomes, ready", [
    ([], True),
    (["transient"] * 4, True),
    (["transient"] * 5, False),
    (["ok"] + ["transient"] * 5, False),
    (["transient"] * 4 + ["ok"], True),
    (["transient", "transient", "other", "transient", "transient"], True),
    (["configuration"] * 5, False),
    (["other"] * 5, True),  # throttled, rejected or paused: SES answers
])
def test_ses_is_not_answering_when_its_last_calls_all_failed(outcomes, ready):
    reason = ses_verdict(outcomes, "TransientError: connection refused", window=5)
    assert (reason == "") is ready
    if not ready:
        assert reason.endswith("TransientError: connection refused")


async def test_past_the_bound_queued_rows_are_dropped_and_outcomes_wait_for_room():
    written: list[str] = []
    database_up = asyncio.Event()

    async def commit(batch: list[str]) -> None:
        if not database_up.is_set():
            raise sa_exc.OperationalError("INSERT", {}, sqlite3.OperationalError("locked"))
        written.extend(batch)

    writer = BatchWriter(commit, max_rows=10, window=0.0)
    writer.start()
    try:
        for i in range(5):
            await writer.submit(f"outcome-{i}", 2, may_wait=True)
        assert writer.pending_rows == 10
        await writer.submit("queued-x", 3, may_wait=False)  # no room: not kept
        assert writer.dropped_rows == 3
        waiting = asyncio.create_task(writer.submit("outcome-5", 2, may_wait=True))
        for _ in range(500):  # until the writer's first commit has failed
            if writer.failing_since is not None:
                break
            await asyncio.sleep(0.01)
        assert writer.problem().startswith("database: message log cannot write (10 rows")
        assert not waiting.done()  # the database is down: it cannot have found room
        database_up.set()
        await asyncio.wait_for(waiting, 10)
        await asyncio.wait_for(writer.flush(), 10)
        assert written == [f"outcome-{i}" for i in range(6)]
        assert writer.problem() == ""
    finally:
        await writer.stop(1.0)
