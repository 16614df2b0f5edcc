"""`relay sendmail`: messages piped in the way applications call /usr/sbin/sendmail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ingress.sendmail import header_recipients, normalize_argv, read_message
from tests.conftest import ROOT, RelayProcess, relayed, wait_for

MESSAGE = (
    "From: Reports <reports@example.com>\n"
    "To: Ann <ann@example.net>\n"
    "Cc: \"Bo, B.\" <bo@example.net>\n"
    "Bcc: secret@example.org,\n"
    "  other@example.org\n"
    "Subject: nightly report\n"
    "Date: Mon, 23 Nov 2026 00:00:00 +0000\n"
    "Message-ID: <nightly-1@example.com>\n"
    "\n"
    "Totals: 3\n"
    "Bcc: this line is body, not a header\n"
)
WITHOUT_BCC = (
    b"From: Reports <reports@example.com>\r\n"
    b"To: Ann <ann@example.net>\r\n"
    b"Cc: \"Bo, B.\" <bo@example.net>\r\n"
    b"Subject: nightly report\r\n"
    b"Date: Mon, 23 Nov 2026 00:00:00 +0000\r\n"
    b"Message-ID: <nightly-1@example.com>\r\n"
    b"\r\n"
    b"Totals: 3\r\n"
    b"Bcc: this line is body, not a header\r\n"
)
LOCAL_RECEIVED = re.compile(
    rb"Received: from [^\r\n]+\r\n\tby [^\r\n]+ \(relay\) with local;\r\n\t[^\r\n]+\r\n")
ALL = ["ann@example.net", "bo@example.net", "secret@example.org", "other@example.org"]


def env_for(smtp_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT)
    env["RELAY_SMTP__PORT"] = str(smtp_port)
    return env


def sendmail(relay: RelayProcess, port: int, *args: str, data: str = MESSAGE,
             ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "relay", "sendmail", "-c", str(relay.config), *args]
    return subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=60,
                          env=env_for(port), cwd=relay.workdir)


def test_dash_t_delivers_to_to_cc_and_bcc_and_strips_bcc(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    out = sendmail(relay, relay.smtp_port, "-t", "-i", "-v")
    assert out.returncode == 0, out.stderr
    assert "queued by the relay" in out.stderr
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert len(calls) == 1
    assert calls[0].recipients == ALL
    assert calls[0].sender == "reports@example.com"  # from the From header without -f
    assert relayed(calls[0].raw) == WITHOUT_BCC
    assert relay.find("accepted")


def test_spool_used_when_the_relay_is_not_running(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    port = relay.smtp_port
    assert relay.stop() == 0  # nothing listens on `port` now
    out = sendmail(relay, port, "-t", "-f", "bounces@example.com", "-v")
    assert out.returncode == 0, out.stderr
    assert "queued as" in out.stderr
    assert len(relay.queued("active")) == 1 and relay.queued("incoming") == []
    relay.start()
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert calls[0].recipients == ALL and calls[0].sender == "bounces@example.com"
    # the same header changes as the SMTP ingress makes, with a Received line of its own
    m = LOCAL_RECEIVED.match(calls[0].raw)
    assert m, calls[0].raw[:300]
    assert calls[0].raw[m.end():] == WITHOUT_BCC


def test_errors_name_what_is_wrong(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    out = sendmail(relay, relay.smtp_port, data="Subject: none\n\nbody\n")
    assert out.returncode == 64 and "no recipients" in out.stderr
    out = sendmail(relay, relay.smtp_port, "@example.net")
    assert out.returncode == 65 and "not an address: @example.net" in out.stderr
    out = sendmail(relay, relay.smtp_port, "a@example.net", data="")
    assert out.returncode == 65 and "no message" in out.stderr
    assert sandbox.state.calls == [] and relay.queued("active") == []


PROGRAMS = {
    # a cron job's report, the way shell scripts mail
    "sh": ("sh", """#!/bin/sh
set -e
{
  printf 'From: cron@example.com\\n'
  printf 'To: ops@example.net\\n'
  printf 'Subject: disk report\\n\\n'
  printf 'all fine\\n.\\nstill the body\\n'
} | "$SENDMAIL" -t -oi
"""),
    # a Perl program opening a pipe to sendmail, as CGI scripts and Mail::Mailer do
    "perl": ("perl", """use strict;
open(my $mh, "|-", $ENV{SENDMAIL}, "-oi", "-t", "-fcron\\@example.com")
    or die "cannot run sendmail: $!";
print $mh "From: cron\\@example.com\\nTo: ops\\@example.net\\nSubject: disk report\\n\\n";
print $mh "all fine\\n.\\nstill the body\\n";
close($mh) or die "sendmail failed: $?";
"""),
}


@pytest.mark.parametrize("lang", sorted(PROGRAMS))
def test_a_program_that_pipes_to_sendmail(start_relay, sandbox, tmp_path: Path, lang: str):
    interpreter, source = PROGRAMS[lang]
    if shutil.which(interpreter) is None:
        pytest.skip(f"{interpreter} not installed")
    relay = start_relay(sandbox.url)
    wrapper = tmp_path / "sendmail"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m relay sendmail '
                       f'-c "{relay.config}" "$@"\n')
    wrapper.chmod(0o755)
    program = tmp_path / f"app.{lang}"
    program.write_text(source)
    env = env_for(relay.smtp_port) | {"SENDMAIL": str(wrapper)}
    out = subprocess.run([interpreter, str(program)], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert calls[0].recipients == ["ops@example.net"]
    assert calls[0].sender == "cron@example.com"
    head, body = relayed(calls[0].raw).split(b"\r\n\r\n", 1)
    assert head.startswith(b"From: cron@example.com\r\nTo: ops@example.net\r\n"
                           b"Subject: disk report\r\nDate: ")
    assert b"\r\nMessage-ID: <" in head  # added by the relay, as for any SMTP client
    assert body == b"all fine\r\n.\r\nstill the body\r\n"


@pytest.mark.parametrize("raw,dot_ends,expected", [
    (b"a\nb\n", True, b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", True, b"a\r\nb\r\n"),
    (b"a\n.\nb\n", True, b"a\r\n"),
    (b"a\n.\nb\n", False, b"a\r\n.\r\nb\r\n"),
])
def test_read_message(raw: bytes, dot_ends: bool, expected: bytes):
    import io

    assert read_message(io.BytesIO(raw), dot_ends=dot_ends) == expected


def test_header_recipients_keep_other_bytes_untouched():
    data = (b"To: a@x.example\r\nBCC: b@x.example\r\nSubject: =?utf-8?q?caf=C3=A9?= \xe9\r\n"
            b"\r\nbody\r\n")
    rcpts, out = header_recipients(data)
    assert rcpts == ["a@x.example", "b@x.example"]
    assert out == data.replace(b"BCC: b@x.example\r\n", b"")


def test_old_style_options():
    assert normalize_argv(["-oi", "-odb", "-bm", "-ffrom@x.example", "-t", "a@b.example"]) == [
        "-i", "-f", "from@x.example", "-t", "a@b.example"]


def test_debian_crons_exact_command_line_delivers_to_the_sandbox(start_relay, sandbox):
    """cron runs `sendmail -FCronDaemon -i -B8BITMIME -oem root` with its own headers and
    no From address: the bare name gets sendmail.local_domain, sender and recipient."""
    relay = start_relay(sandbox.url, sendmail={"local_domain": "host.example.com"})
    cron_mail = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n"
                 "Content-Type: text/plain; charset=UTF-8\n\nhello from cron\n")
    out = sendmail(relay, relay.smtp_port, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                   data=cron_mail)
    assert out.returncode == 0, out.stderr
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert calls[0].recipients == ["root@host.example.com"]
    assert calls[0].sender.endswith("@host.example.com")
    assert b"hello from cron" in calls[0].raw
    # the header fields' bare names are qualified too, as Postfix's cleanup does
    assert b"From: Cron Daemon <root@host.example.com>\r\n" in calls[0].raw
    assert b"To: root@host.example.com\r\n" in calls[0].raw


def test_options_daemons_pass_are_taken_apart_or_attached():
    assert normalize_argv(["-B", "8BITMIME", "-F", "Cron Daemon", "-N", "never", "-R", "hdrs",
                           "-V", "envid", "-X", "/log", "-r", "a@b.example", "-i", "c@d.example"]
                          ) == ["-f", "a@b.example", "-i", "c@d.example"]
    assert normalize_argv(["-FCronDaemon", "-B8BITMIME", "-oem", "-odb", "-bm", "-U", "root"]
                          ) == ["root"]


def test_a_sender_the_relay_refuses_is_named_with_the_setting_to_change(start_relay, sandbox):
    relay = start_relay(sandbox.url, smtp={"allowed_sender_domains": ["example.com"]},
                        sendmail={"local_domain": "other.example"})
    out = sendmail(relay, relay.smtp_port, "root", data="Subject: x\n\nbody\n")
    assert out.returncode == 69
    assert "553" in out.stderr and "root@other.example" in out.stderr
    assert "sendmail.local_domain" in out.stderr and "b'" not in out.stderr
    assert sandbox.state.calls == []



def test_relay_called_by_the_name_sendmail_is_the_injector(start_relay, sandbox, tmp_path):
    relay = start_relay(sandbox.url, sendmail={"local_domain": "host.example.com"})
    link = tmp_path / "bin" / "sendmail"  # as /usr/sbin/sendmail -> relay in the image
    link.parent.mkdir()
    link.symlink_to(Path(sys.executable).parent / "relay")
    env = {**env_for(relay.smtp_port), "RELAY_CONFIG": str(relay.config)}
    out = subprocess.run([str(link), "-oi", "-t"], input=MESSAGE, capture_output=True,
                         text=True, timeout=60, env=env, cwd=relay.workdir)
    assert out.returncode == 0, out.stderr
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert sorted(calls[0].recipients) == sorted(ALL)


def test_a_message_without_from_gets_the_envelope_senders(start_relay, sandbox):
    """The README's first message: no From header, -f names the sender."""
    relay = start_relay(sandbox.url)
    out = sendmail(relay, relay.smtp_port, "-f", "app@example.com", "you@example.net",
                   data="Subject: hello\n\nfirst message\n")
    assert out.returncode == 0, out.stderr
    calls = wait_for(lambda: sandbox.state.accepted(), 20)
    assert calls[0].raw.startswith(b"From: app@example.com\r\n") or (
        b"\r\nFrom: app@example.com\r\n" in calls[0].raw)
    assert calls[0].raw.count(b"From: ") == 1

