"""The relay when its database misbehaves: a held SQLite write lock and a PostgreSQL
server stopped and started again. The message log keeps every row it could not write and
writes it once the database is back; /readyz says why while it cannot."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import RelayProcess, readyz, relay_sections, wait_for
from tests.pg_cluster import PgCluster, pg_bin

SENDER = "app@example.com"


def send(port: int, rcpts: list[str]) -> None:
    data = (f"From: <{SENDER}>\r\nTo: list@example.org\r\nSubject: fault\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\nbody\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(SENDER, rcpts, data)


def batch(count: int, per: int) -> list[list[str]]:
    return [[f"r{m}-{i}@example.net" for i in range(per)] for m in range(count)]


def sqlite_rows(path: Path) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(path, timeout=30) as db:
        rows = db.execute("SELECT recipient, status, ses_message_id FROM messages").fetchall()
    db.close()
    return {r: (status, ses) for r, status, ses in rows}


def pg_rows(url: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["psql", url, "-At", "-F", "\t", "-c",
                          "SELECT recipient, status, ses_message_id FROM messages"],
                         capture_output=True, text=True, timeout=60, check=True)
    return {r: (s, m) for r, s, m in (line.split("\t") for line in out.stdout.splitlines())}


def all_sent(rows: dict[str, tuple[str, str]], rcpts: list[str]) -> bool:
    return all(rows.get(r, ("", ""))[0] == "sent" and rows[r][1] for r in rcpts)


def test_a_held_sqlite_write_lock_delays_the_message_log_but_loses_no_row(tmp_path, sandbox):
    db_path = tmp_path / "log.db"
    relay = RelayProcess(tmp_path, relay_sections(
        tmp_path, sandbox.url, database={"url": f"sqlite:///{db_path}", "lock_timeout": "0.2s"}))
    lock = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        relay.start()
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        messages = batch(12, 3)
        for rcpts in messages:
            send(relay.smtp_port, rcpts)
        rcpts = [r for m in messages for r in m]
        wait_for(lambda: sandbox.state.recipients_sent() >= len(rcpts), 60)
        # the log's first commit failed; a write lock held for good reads the same
        failed = wait_for(lambda: relay.find("log_retry") or relay.find("log_error"), 30)
        assert "database is locked" in failed["error"]
        code, text = readyz(relay.admin_port)
        assert code == 503 and "database is locked" in text, text
        lock.execute("ROLLBACK")
        wait_for(lambda: all_sent(sqlite_rows(db_path), rcpts), 60)
        wait_for(lambda: relay.find("log_recovered"), 30)
        assert relay.find("log_error") is None
        wait_for(lambda: readyz(relay.admin_port) == (200, "ready\n"), 30)
    finally:
        lock.close()
        assert relay.stop() == 0


@pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL server binaries are not installed")
def test_postgresql_stopped_and_started_again_loses_no_message_log_row(tmp_path, sandbox):
    cluster = PgCluster()
    relay = RelayProcess(tmp_path, relay_sections(
        tmp_path, sandbox.url, database={"url": cluster.url, "shared_rate": False}))
    try:
        cluster.start()
        relay.start()
        messages = batch(8, 3)
        rcpts = [r for m in messages for r in m]
        sandbox.state.answers.clear()  # SES holds its answers while the database goes away
        for m in messages:
            send(relay.smtp_port, m)
        wait_for(lambda: all(r in pg_rows(cluster.url) for r in rcpts), 30)  # queued rows
        wait_for(lambda: sandbox.state.inflight >= 1, 30)
        cluster.stop()
        sandbox.state.answers.set()
        wait_for(lambda: relay.find("log_retry") or relay.find("log_error"), 60)
        code, text = readyz(relay.admin_port)
        assert code == 503 and "database" in text, text
        cluster.start()
        wait_for(lambda: all_sent(pg_rows(cluster.url), rcpts), 90)
        assert sandbox.state.recipients_sent() == len(rcpts)
        assert relay.find("log_error") is None
    finally:
        sandbox.state.answers.set()
        assert relay.stop() == 0
        cluster.remove()


# -- readiness: one reason per dependency ----------------------------------------------


@pytest.fixture
def mounts(tmp_path):
    """Small tmpfs file systems the test can fill and remount read-only (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made: list[Path] = []

    def mount(name: str, size: str = "4m") -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, timeout=30)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, timeout=30)


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, timeout=30)


def ready_reason(relay: RelayProcess, words: str) -> str:
    """Wait until /readyz answers 503 with a line holding `words`; that line."""
    def check() -> str:
        code, text = readyz(relay.admin_port)
        lines = [x for x in text.splitlines() if words in x]
        return lines[0] if code == 503 and lines else ""
    return str(wait_for(check, 30))


def test_readyz_says_the_spool_is_full_then_ready_once_space_returns(tmp_path, sandbox, mounts):
    spool = mounts("spool", "4m")
    relay = RelayProcess(tmp_path, relay_sections(
        tmp_path, sandbox.url, spool={"dir": str(spool), "min_free_bytes": "1MB"}))
    try:
        relay.start()
        assert readyz(relay.admin_port) == (200, "ready\n")
        filler = spool / "filler"
        with open(filler, "wb") as fh:
            fh.write(b"\0" * (3 * 1024 * 1024 + 512 * 1024))
        line = ready_reason(relay, "is full")
        assert line.startswith(f"- spool {spool} is full: ")
        assert "spool.min_free_bytes" in line
        filler.unlink()
        wait_for(lambda: readyz(relay.admin_port) == (200, "ready\n"), 30)
    finally:
        assert relay.stop() == 0


def test_readyz_says_the_spool_is_not_writable_on_a_read_only_remount(tmp_path, sandbox,
                                                                    mounts):
    spool = mounts("spool")
    relay = RelayProcess(tmp_path, relay_sections(
        tmp_path, sandbox.url, spool={"dir": str(spool)},
        database={"url": f"sqlite:///{tmp_path}/relay.db"}))
    try:
        relay.start()
        remount(spool, "ro")
        line = ready_reason(relay, "not writable")
        assert line == f"- spool {spool} is not writable: Read-only file system"
        remount(spool, "rw")
        wait_for(lambda: readyz(relay.admin_port) == (200, "ready\n"), 30)
    finally:
        remount(spool, "rw")
        assert relay.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_readyz_says_a_read_only_sqlite_database_cannot_take_a_write(tmp_path, sandbox):
    db = tmp_path / "relay.db"
    relay = RelayProcess(tmp_path, relay_sections(
        tmp_path, sandbox.url, database={"url": f"sqlite:///{db}"}))
    try:
        relay.start()
        assert readyz(relay.admin_port) == (200, "ready\n")
        chattr("+i", db)  # immutable: opened from now on, it is read-only even for root
        line = ready_reason(relay, "cannot take a write")
        assert line.startswith(f"- database sqlite+aiosqlite:///{db} cannot take a write: ")
        assert line.endswith(f"PermissionError: {db} is read-only")
        chattr("-i", db)
        wait_for(lambda: readyz(relay.admin_port) == (200, "ready\n"), 30)
    finally:
        chattr("-i", db)
        assert relay.stop() == 0


def test_readyz_says_ses_is_not_answering_while_every_call_fails(tmp_path, sandbox):
    relay = RelayProcess(tmp_path, relay_sections(tmp_path, sandbox.url))
    try:
        relay.start()
        sandbox.state.script(*["5xx"] * 5)
        send(relay.smtp_port, ["a@example.net"])
        line = ready_reason(relay, "SES not answering")
        assert line.startswith("- SES not answering: the last 5 calls failed: TransientError")
        # the faults are used up: the next retry gets through and SES answers again
        wait_for(lambda: sandbox.state.recipients_sent() == 1, 60)
        wait_for(lambda: readyz(relay.admin_port) == (200, "ready\n"), 30)
    finally:
        assert relay.stop() == 0
