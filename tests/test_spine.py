"""End to end: real SMTP clients -> `relay serve` child process -> SES (moto or the sandbox)."""

from __future__ import annotations

import resource
import shutil
import smtplib
import socket
import subprocess
import sys

import boto3
import pytest

from relay.sandbox.server import SandboxState, SandboxThread
from tests import spoolfile
from tests.conftest import relayed, wait_for

SENDER = "app@example.com"


def message(subject: str = "hello", body: str = "body line\r\n", **headers: str) -> bytes:
    lines = [f"From: App <{SENDER}>", "To: to@example.net", "Cc: cc@example.net",
             f"Subject: {subject}", "Date: Sun, 22 Nov 2026 10:00:00 +0000",
             "Message-ID: <m1@example.com>"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def send(port: int, rcpts: list[str], data: bytes, sender: str = SENDER) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            code, msg = s.rcpt(r)
            assert code == 250, (code, msg)
        return s.data(data)


def moto_backend():
    from moto.ses.models import ses_backends

    return ses_backends["123456789012"]["us-east-1"]


@pytest.fixture
def verified_moto(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("sesv2", region_name="us-east-1", endpoint_url=moto_server)
    client.create_email_identity(EmailIdentity="example.com")
    moto_backend().sent_messages.clear()
    return moto_server


def test_message_reaches_moto_byte_identical_with_to_cc_and_bcc(start_relay, verified_moto):
    # moto has no GetAccount: the relay falls back on delivery.max_rate
    relay = start_relay(verified_moto, delivery={"max_rate": 50})
    # dot-stuffing, a long line, 8-bit bytes and odd spacing must all survive unchanged
    body = "line one\r\n.leading dot\r\n" + "x" * 900 + "\r\n  indented\t tab \r\n"
    data = message(body=body)
    rcpts = ["to@example.net", "cc@example.net", "hidden@example.org"]
    code, reply = send(relay.smtp_port, rcpts, data)
    assert code == 250 and b"queued as" in reply

    sent = wait_for(lambda: moto_backend().sent_messages, 20)
    assert len(sent) == 1
    # identical except the relay's Received line: every other header and the body,
    # byte for byte
    assert relayed(sent[0].raw_data.encode()) == data
    # moto adds the header addresses after the Destination the relay gave it
    assert sent[0].destinations[: len(rcpts)] == rcpts
    assert "hidden@example.org" in sent[0].destinations
    assert sent[0].source == SENDER
    wait_for(lambda: not relay.queued("active"), 10)
    wait_for(lambda: relay.find("sent"), 10)  # the log reader thread may lag a moment


def test_message_rejected_lands_in_failed_with_reason(start_relay, moto_server, monkeypatch):
    # moto answers MessageRejected for a sender whose identity is not verified
    relay = start_relay(moto_server)
    code, _ = send(relay.smtp_port, ["x@example.net"], message(), sender="nobody@unverified.test")
    assert code == 250
    failed = wait_for(lambda: relay.queued("failed"), 20)
    record = spoolfile.record(relay.spool / "failed" / failed[0])
    assert "MessageRejected" in record["last_error"]
    assert record["results"]["x@example.net"]["status"] == "failed"
    assert "MessageRejected" in record["results"]["x@example.net"]["reason"]
    assert relayed(spoolfile.mime(relay.spool / "failed" / failed[0])) == message()
    assert not relay.queued("active") and not relay.queued("deferred")


def test_sigkill_after_250_then_restart_delivers_exactly_once(start_relay, tmp_path):
    state = SandboxState(outbox=tmp_path / "out", max_send_rate=100, sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        # GetAccount says sending is disabled: the relay holds the mail in active/
        wait_for(lambda: relay.find("paused"), 10)
        code, reply = send(relay.smtp_port, ["a@example.net"], message("kill"))
        assert code == 250
        qid = reply.decode().rsplit(" ", 1)[1]
        relay.kill()
        assert relay.queued("active") == [qid]
        assert state.accepted() == []

        state.sending_enabled = True
        relay.start()
        wait_for(lambda: state.accepted(), 20)
        wait_for(lambda: not relay.queued("active"), 10)
        calls = state.accepted()
        assert len(calls) == 1 and relayed(calls[0].raw) == message("kill")
        assert calls[0].recipients == ["a@example.net"]
        assert list((tmp_path / "out").glob("*.eml"))
        assert relay.stop() == 0
        assert len(state.accepted()) == 1


def test_ses_down_mail_waits_in_deferred_then_delivered(start_relay, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # nothing listens on `port` yet: every call fails to connect
    relay = start_relay(f"http://127.0.0.1:{port}", ses={"connect_timeout": "1s"})
    code, reply = send(relay.smtp_port, ["a@example.net", "b@example.net"], message("down"))
    assert code == 250
    qid = reply.decode().rsplit(" ", 1)[1]
    wait_for(lambda: qid in relay.queued("deferred"), 20)
    record = spoolfile.record(relay.spool / "deferred" / qid)
    assert record["attempts"] >= 1 and record["last_error"]
    assert record["results"] == {}

    state = SandboxState(outbox=tmp_path / "out", max_send_rate=100)
    with SandboxThread(state, port=port):
        wait_for(lambda: state.accepted(), 30)
        wait_for(lambda: not relay.queued("deferred") and not relay.queued("active"), 10)
    calls = state.accepted()
    assert len(calls) == 1
    assert calls[0].recipients == ["a@example.net", "b@example.net"]
    assert relayed(calls[0].raw) == message("down")


def test_spool_below_min_free_answers_452_and_keeps_nothing(start_relay, sandbox):
    relay = start_relay(sandbox.url, spool={"min_free_bytes": "1000000GB"})
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail(SENDER)
        s.rcpt("a@example.net")
        code, reply = s.data(message())
    assert code == 452 and b"4.3.1" in reply
    for state in ("incoming", "active", "deferred", "failed"):
        assert relay.queued(state) == []
    assert sandbox.state.calls == []


def test_spool_write_error_answers_451_and_keeps_nothing(start_relay, sandbox):
    # room for the database (suppression list, message log), not for the big message
    limit = 1024 * 1024

    def small_files() -> None:
        # writing past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    relay = start_relay(sandbox.url, preexec=small_files)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail(SENDER)
        s.rcpt("a@example.net")
        code, reply = s.data(message(body="y" * 100 + "\r\n") * 1 + (b"z" * 76 + b"\r\n") * 20000)
        assert code == 451 and b"4.3.0" in reply, (code, reply)
        # the session goes on: a small message right after is accepted
        s.rset()
        s.mail(SENDER)
        s.rcpt("a@example.net")
        code, _ = s.data(message("small"))
        assert code == 250
    wait_for(lambda: sandbox.state.accepted(), 20)
    assert [relayed(c.raw) for c in sandbox.state.accepted()] == [message("small")]
    assert relay.queued("incoming") == []


def test_client_outside_allowed_networks_is_refused(start_relay, sandbox):
    relay = start_relay(sandbox.url, smtp={"allowed_networks": ["192.0.2.0/24"]})
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        code, reply = s.mail(SENDER)
        assert code == 554 and b"5.7.1" in reply
        code, _ = s.rcpt("a@example.net")
        assert code >= 500
    assert relay.queued("active") == []


def test_smtputf8_is_not_advertised(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        assert not s.has_extn("smtputf8")
        assert s.has_extn("size")


def test_disconnect_right_after_final_dot_still_queues(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        for cmd in (b"EHLO c.example", b"MAIL FROM:<app@example.com>", b"RCPT TO:<a@example.net>",
                    b"DATA"):
            s.sendall(cmd + b"\r\n")
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            assert line[:1] in (b"2", b"3"), line
        s.sendall(message("hangup") + b".\r\n")
        s.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: sandbox.state.accepted(), 20)
    assert relayed(sandbox.state.accepted()[0].raw) == message("hangup")


def test_sigterm_stops_cleanly_and_keeps_queued_mail(start_relay, tmp_path):
    state = SandboxState(max_send_rate=100, sending_enabled=False)
    with SandboxThread(state) as sb:
        relay = start_relay(sb.url)
        code, reply = send(relay.smtp_port, ["a@example.net"], message())
        assert code == 250
        assert relay.stop() == 0
        wait_for(lambda: relay.find("stopped"), 10)
        assert len(relay.queued("active")) == 1


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_quick_start_config_with_swaks(tmp_path):
    """The README's quick start: conf/local.toml on the sandbox, a message sent with swaks."""
    from tests.conftest import ROOT, RelayProcess, relay_sections

    sections = relay_sections(tmp_path, "sandbox", sandbox={"dir": str(tmp_path / "mail")})
    relay = RelayProcess(tmp_path, sections)
    relay.start()
    try:
        body = "Hello from swaks.\nSecond line, unchanged.\n"
        args = ["swaks", "--from", SENDER, "--to", "someone@example.net",
                "--header", "Subject: quick start", "--body", body]
        out = subprocess.run(args + ["--server", f"127.0.0.1:{relay.smtp_port}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        # what swaks puts on the wire after the headers (it adds trailing blank lines)
        dump = subprocess.run(args + ["--dump-mail"], capture_output=True, timeout=60).stdout
        files = wait_for(lambda: list((tmp_path / "mail").glob("*.eml")), 20)
        eml = files[0].read_bytes()
        assert b"Subject: quick start" in eml
        eml_body = eml.split(b"\r\n\r\n", 1)[1]
        assert eml_body.startswith(body.replace("\n", "\r\n").encode())
        assert eml_body.rstrip(b"\r\n") == dump.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")
    finally:
        assert relay.stop() == 0
    assert (ROOT / "conf" / "local.toml").exists()


def test_core_modules_import_no_transport():
    code = (
        "import sys, relay.spool.record, relay.spool.spool, relay.spool.commit,"
        " relay.delivery.pool, relay.delivery.retry, relay.delivery.ratelimit, relay.errors;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('aiosmtpd', 'aioboto3', 'aiobotocore', 'botocore', 'aiohttp')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
