"""Helpers shared by the feedback tests: fixtures as SES would send them, SNS envelopes
signed by a test CA's certificate, CLI calls."""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import json
import os
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, RelayProcess

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ses"
SENDER = "app@example.com"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem"


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@functools.cache
def pki() -> tuple[Any, bytes]:
    """A test CA and an SNS-like signing certificate it issued: (its key, its PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(_name("relay test CA"))
          .issuer_name(_name("relay test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(_name("sns.amazonaws.com"))
            .issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def signed(key: Any, msg: dict[str, Any], version: str = "1") -> dict[str, Any]:
    """msg with SignatureVersion and the Signature SNS would compute with `key`."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from relay.feedback.sns import string_to_sign

    msg = dict(msg, SignatureVersion=version)
    algo = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(string_to_sign(msg), padding.PKCS1v15(), algo)
    msg["Signature"] = base64.b64encode(signature).decode()
    return msg


def sns_message(doc: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The SNS envelope of an SES document (unsigned), as SNS delivers it to SQS or /sns."""
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": TOPIC,
            "Subject": "Amazon SES Email Event Notification", "Message": json.dumps(doc),
            "Timestamp": "2026-11-22T00:00:00.000Z", "SigningCertURL": CERT_URL,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe", **extra}


def signed_envelope(doc: dict[str, Any], **extra: Any) -> str:
    """An SQS body: the SES document in an SNS envelope signed by the test certificate."""
    return json.dumps(signed(pki()[0], sns_message(doc, **extra)))


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def notification(name: str, *, message_id: str, destination: list[str],
                 recipients: list[str] | None = None, at: float | None = None
                 ) -> dict[str, Any]:
    """A documented SES sample re-addressed to a message the test sent, and re-timed to
    `at` (default now: SES reports a message just sent)."""
    doc = copy.deepcopy(fixture(name))
    recipients = destination if recipients is None else recipients
    stamp = iso(time.time() if at is None else at)
    for section in doc.values():
        if isinstance(section, dict) and "timestamp" in section:
            section["timestamp"] = stamp
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
