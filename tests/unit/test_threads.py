"""Helper threads give way to the loop's thread: they run SCHED_BATCH, the loop does not."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from relay.spool.commit import CommitThread
from relay.store.thread_engine import ThreadEngine

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling")


def test_the_commit_thread_runs_as_a_batch_thread():
    seen: list[int] = []
    ran = threading.Event()
    thread = CommitThread(name="test-commit")

    def job() -> None:
        seen.append(os.sched_getscheduler(0))
        ran.set()

    thread.submit(job)
    assert ran.wait(30)
    assert seen == [os.SCHED_BATCH]
    # the submitting thread (the loop's, in the relay) keeps its normal policy
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


async def test_the_message_log_writer_and_the_thread_pool_run_as_batch_threads(tmp_path):
    from relay.service import _prepare_loop

    engine = ThreadEngine(tmp_path / "t.db", lock_timeout=1.0)
    try:
        assert await engine.transaction(lambda _conn: os.sched_getscheduler(0)) == (
            os.SCHED_BATCH)
    finally:
        await engine.close()
    interval = sys.getswitchinterval()
    try:
        _prepare_loop(asyncio.Event())  # the loop's default executor, as the relay's
        assert await asyncio.to_thread(os.sched_getscheduler, 0) == os.SCHED_BATCH
    finally:
        sys.setswitchinterval(interval)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
