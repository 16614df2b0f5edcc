"""Invariant 1 under group commit: 250 only after the shared flushes; flushes are shared.

The spool's flush is gated here so the test decides when it returns: the reply
must wait for a flush that ran after the message's file was written *and* one that ran
after its rename into active/. A relay that answered before either, or skipped the second,
fails these tests. The ingress is the real one (relay.ingress over aiosmtpd) with a real
smtplib client, and delivery calls go to the real sandbox through the real SES client.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.config import SesConfig, SmtpConfig
from relay.delivery.pool import DeliveryPool
from relay.delivery.ratelimit import RateLimiter
from relay.delivery.retry import RetryPolicy
from relay.errors import SpoolError
from relay.sandbox.server import SandboxState, SandboxThread
from relay.ses.client import SesClient
from relay.spool.commit import GroupCommit
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
from tests.conftest import wait_for
from tests.ingress_server import IngressThread

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: gc\r\n\r\nbody\r\n"


class GatedSpool(Spool):
    """A real spool whose flushes wait for the test, noting what was on disk at each."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=True)
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.seen: list[tuple[list[str], list[str]]] = []
        self.flushes = 0

    def flush(self) -> None:
        self.seen.append((sorted(p.name for p in self.dir(State.INCOMING).iterdir()),
                          sorted(p.name for p in self.dir(State.ACTIVE).iterdir())))
        self.entered.release()
        assert self.gate.acquire(timeout=30), "the test never opened the gate"
        super().flush()
        self.flushes += 1


def _send(port: int, replies: list[tuple[int, bytes]], rcpt: str = "b@example.net") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        s.rcpt(rcpt)
        replies.append(s.data(MESSAGE))


def _ingress(tmp_path: Path, **handler_kw: Any) -> IngressThread:
    config = replace(SmtpConfig(host="127.0.0.1", port=0), hostname="relay.test")
    server = IngressThread(tmp_path / "spool", config, **handler_kw)
    server.spool = GatedSpool(tmp_path / "spool")
    server.spool.ensure()
    return server.start()


def test_250_waits_for_a_flush_after_the_files_and_one_after_the_rename(tmp_path):
    server = _ingress(tmp_path)
    spool = server.spool
    replies: list[tuple[int, bytes]] = []
    client = threading.Thread(target=_send, args=(server.port, replies))
    try:
        client.start()
        # first flush: the message's files are written in incoming/, nothing in active/
        assert spool.entered.acquire(timeout=30)
        incoming, active = spool.seen[0]
        assert len(incoming) == 1 and active == []
        qid = incoming[0]
        assert spool.path(State.INCOMING, qid).read_bytes().endswith(b"body\r\n")
        client.join(timeout=1.0)
        assert not replies, "250 before the message's files were flushed"
        spool.gate.release()
        # second flush: renamed into active/ and not yet answered
        assert spool.entered.acquire(timeout=30), "no flush after the rename into active/"
        assert spool.seen[1] == ([], [qid])
        client.join(timeout=1.0)
        assert not replies, "250 before the rename into active/ was flushed"
        spool.gate.release()
        client.join(timeout=30)
        assert replies and replies[0][0] == 250 and qid.encode() in replies[0][1]
        assert spool.flushes == 2
    finally:
        for _ in range(4):
            spool.gate.release()
        client.join(timeout=30)
        server.stop()


class Queued:
    """The QueuedListener port, noting how many flushes had finished when it was told."""

    def __init__(self, spool: GatedSpool) -> None:
        self.spool = spool
        self.told: list[tuple[str, Envelope | None, bytes | None, int]] = []

    def queued(self, qid: str, envelope: Envelope | None = None, head: bytes | None = None
               ) -> None:
        self.told.append((qid, envelope, head, self.spool.flushes))


def test_the_queued_listener_hears_of_a_message_only_once_it_is_durable(tmp_path):
    spool = GatedSpool(tmp_path / "spool")
    listener = Queued(spool)
    server = IngressThread(tmp_path / "spool", replace(SmtpConfig(host="127.0.0.1", port=0),
                                                       hostname="relay.test"),
                           listener=listener)
    server.spool = spool
    spool.ensure()
    server.start()
    replies: list[tuple[int, bytes]] = []
    client = threading.Thread(target=_send, args=(server.port, replies))
    try:
        client.start()
        for _ in range(2):
            assert spool.entered.acquire(timeout=30)
            assert listener.told == [], "told before the message was durable"
            spool.gate.release()
        client.join(timeout=30)
        assert replies and replies[0][0] == 250
        [(qid, envelope, head, flushes)] = listener.told
        assert flushes == 2 and qid.encode() in replies[0][1]
        assert envelope is not None and envelope.sender == "a@example.com"
        assert envelope.recipients == ("b@example.net",) and envelope.client == "127.0.0.1"
        # the header block as stored, so the message log never reads it back from the spool
        assert head is not None and head.startswith(b"Received: from client.example")
        assert head.endswith(b"body\r\n")
    finally:
        for _ in range(4):
            spool.gate.release()
        client.join(timeout=30)
        server.stop()


def test_concurrent_sessions_share_one_pair_of_flushes(tmp_path):
    server = _ingress(tmp_path)
    spool = server.spool
    commit: GroupCommit = server.ingress.handler.commit  # type: ignore[union-attr]
    replies: list[tuple[int, bytes]] = []
    first = threading.Thread(target=_send, args=(server.port, replies))
    others = [threading.Thread(target=_send, args=(server.port, replies, f"r{i}@example.net"))
              for i in range(10)]
    try:
        first.start()
        assert spool.entered.acquire(timeout=30)  # the first message's flush is held
        for t in others:
            t.start()
        # the ten others are written and wait for the next flush, which none of them skips
        wait_for(lambda: len(commit._next.publish) == 10, 30)
        assert not replies
        for _ in range(4):  # first batch: 2 flushes; the ten: 2 flushes
            spool.gate.release()
        for t in [first, *others]:
            t.join(timeout=30)
        assert sorted(code for code, _ in replies) == [250] * 11
        assert spool.flushes == 4
        assert len(list(spool.scan(State.ACTIVE))) == 11
        assert commit.changes == 11
    finally:
        for _ in range(8):
            spool.gate.release()
        for t in [first, *others]:
            t.join(timeout=30)
        server.stop()


def test_a_failed_flush_answers_451_and_leaves_nothing_queued(tmp_path):
    class FailingSpool(GatedSpool):
        def flush(self) -> None:
            raise OSError(5, "Input/output error")

    config = replace(SmtpConfig(host="127.0.0.1", port=0), hostname="relay.test")
    server = IngressThread(tmp_path / "spool", config)
    server.spool = FailingSpool(tmp_path / "spool")
    server.spool.ensure()
    server.start()
    try:
        replies: list[tuple[int, bytes]] = []
        _send(server.port, replies)
        assert replies[0][0] == 451
        assert list(server.spool.scan(State.ACTIVE)) == []
        assert list(server.spool.scan(State.INCOMING)) == []
    finally:
        server.stop()


def test_delivery_result_is_flushed_before_anyone_hears_of_it(tmp_path):
    """Invariant 3 with shared flushes: the finished message's removal is durable first."""
    spool = GatedSpool(tmp_path / "spool")
    spool.ensure()
    qid = Spool(spool.root, fsync=False).accept(
        Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=time.time()),
        MESSAGE)
    told: list[str] = []

    class Listener:
        async def outcome(self, kind, record, recipients, **kw):  # noqa: ANN001, ANN003
            told.append(kind)

    state = SandboxState(max_send_rate=100)

    async def run() -> None:
        async with SesClient(SesConfig(region="us-east-1"), endpoint_url=sb.url,
                             static_credentials=("t", "t")) as ses:
            pool = DeliveryPool(spool=spool, sender=ses, accounts=ses,
                                limiter=RateLimiter(100), policy=RetryPolicy(1, 10, 3600),
                                listeners=[Listener()])
            await pool.start()
            try:
                loop = asyncio.get_running_loop()
                assert await loop.run_in_executor(None, spool.entered.acquire, True, 30)
                # SES has the message and it is out of active/, but not yet durable:
                assert len(state.accepted()) == 1
                assert spool.seen[-1][1] == []
                await asyncio.sleep(0.5)
                assert told == [], "listeners told before the result was flushed"
                spool.gate.release()
                for _ in range(300):
                    if told:
                        break
                    await asyncio.sleep(0.05)
                assert told == ["sent"]
            finally:
                for _ in range(4):
                    spool.gate.release()
                await pool.stop(5)

    with SandboxThread(state) as sb:
        asyncio.run(run())
    assert list(spool.scan(State.ACTIVE)) == [] and qid not in list(spool.scan(State.INCOMING))


def test_a_message_whose_second_flush_fails_is_never_sent_and_not_left_queued(tmp_path):
    """The rename into active/ happens before the 250; if the flush after it fails the
    client hears 451 and will send again, so delivery must not have taken that copy."""

    class SecondFlushFails(Spool):
        def __init__(self, root: Path) -> None:
            super().__init__(root, fsync=True)
            self.renamed = threading.Event()
            self.go = threading.Event()
            self.flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            if self.flushes == 2:  # the one after the rename into active/
                self.renamed.set()
                assert self.go.wait(30), "the test never let the flush go on"
                raise OSError(5, "Input/output error")
            super().flush()

    spool = SecondFlushFails(tmp_path / "spool")
    spool.ensure()
    state = SandboxState(max_send_rate=100)

    async def run() -> None:
        async with SesClient(SesConfig(region="us-east-1"), endpoint_url=sb.url,
                             static_credentials=("t", "t")) as ses:
            commit = GroupCommit(spool)
            pool = DeliveryPool(spool=spool, sender=ses, accounts=ses,
                                limiter=RateLimiter(100), policy=RetryPolicy(1, 10, 3600),
                                commit=commit)
            qid = spool.prepare(Envelope(sender="a@example.com", recipients=("b@example.net",),
                                         received_at=time.time()), MESSAGE)
            publishing = asyncio.create_task(commit.publish(qid))
            loop = asyncio.get_running_loop()
            try:
                assert await loop.run_in_executor(None, spool.renamed.wait, 30)
                assert list(spool.scan(State.ACTIVE)) == [qid]  # visible, not yet answered
                # as if a scan of active/ had found it: it ends, or it sends
                attempt = asyncio.create_task(pool.attempt.run(qid))
                for _ in range(3000):
                    if attempt.done() or state.calls:
                        break
                    await asyncio.sleep(0.01)
            finally:
                spool.go.set()
            await attempt
            try:
                await publishing
                raise AssertionError("the failed flush was answered as durable")
            except SpoolError:
                pass

    with SandboxThread(state) as sb:
        asyncio.run(run())
    assert state.calls == []  # never sent: the client's retry is the only copy
    assert list(spool.scan(State.ACTIVE)) == []
    assert list(spool.scan(State.INCOMING)) == []
