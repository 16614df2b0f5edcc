"""Helpers shared by the feedback tests: fixtures as SES would send them, CLI calls."""

from __future__ import annotations

import copy
import json
import os
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, RelayProcess

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ses"
SENDER = "app@example.com"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def notification(name: str, *, message_id: str, destination: list[str],
                 recipients: list[str] | None = None) -> dict[str, Any]:
    """A documented SES sample re-addressed to a message the test sent."""
    doc = copy.deepcopy(fixture(name))
    recipients = destination if recipients is None else recipients
    doc["mail"]["messageId"] = message_id
    doc["mail"]["destination"] = destination
    kind = doc.get("notificationType") or doc.get("eventType")
    if kind == "Bounce":
        template = doc["bounce"]["bouncedRecipients"][0]
        doc["bounce"]["bouncedRecipients"] = [dict(template, emailAddress=r) for r in recipients]
        doc["bounce"]["feedbackId"] = str(uuid.uuid4())
    elif kind == "Complaint":
        doc["complaint"]["complainedRecipients"] = [{"emailAddress": r} for r in recipients]
        doc["complaint"]["feedbackId"] = str(uuid.uuid4())
    elif kind == "Delivery":
        doc["delivery"]["recipients"] = recipients
    return doc


def mime(subject: str = "hello", msgid: str = "") -> bytes:
    msgid = msgid or f"<{uuid.uuid4().hex}@example.com>"
    return (f"From: App <{SENDER}>\r\nTo: list@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: {msgid}\r\n\r\nbody\r\n").encode()


def send(port: int, rcpts: list[str], data: bytes | None = None) -> str:
    """Send one message; returns its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail(SENDER)
        for r in rcpts:
            code, msg = s.rcpt(r)
            assert code == 250, (code, msg)
        code, reply = s.data(data or mime())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def cli(relay: RelayProcess | Path, *args: str,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    config = relay.config if isinstance(relay, RelayProcess) else relay
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    proc = subprocess.run([sys.executable, "-m", "relay", *args, "-c", str(config)],
                          capture_output=True, text=True, env=env, timeout=60,
                          cwd=config.parent)
    if check:
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def suppressed(relay: RelayProcess | Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(cli(relay, "suppression", "list", "--json").stdout)
    return {r["address"]: r for r in rows}


def log_lines(relay: RelayProcess | Path, address: str) -> list[dict[str, Any]]:
    return json.loads(cli(relay, "log", address, "--json").stdout)


def statuses(relay: RelayProcess | Path, address: str) -> dict[str, str]:
    """queue id -> message log status for the address."""
    return {x["queue_id"]: x["status"] for x in log_lines(relay, address)
            if x["kind"] == "message"}


TABLES = ("suppressions", "messages", "feedback_events", "bounce_counts")


async def snapshot(tmp: Path, tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple]]:
    """Every row of the feedback tables of the test using `tmp`, on whichever database
    the pass uses (SQLite in its spool directory or its own PostgreSQL database)."""
    from sqlalchemy import text

    from relay.store.db import Database
    from tests.conftest import database_for

    db = await Database.open(database_for(tmp), tmp, migrate=False)
    try:
        async with db.engine.connect() as conn:
            return {t: sorted(tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t}")))
                    for t in tables}
    finally:
        await db.close()
