"""`relay sendmail`: a /usr/sbin/sendmail stand-in for applications that pipe mail to it.

Reads one message on stdin and queues it: through the running relay over SMTP
(smtp.host:smtp.port) so it gets the same checks and is sent at once, or, when nothing
listens there, straight into the spool with Spool.accept (incoming/ -> active/, fsynced)
after the ingress's own rules and header changes; the relay picks it up at its next scan.
Either way it exits 0 only once the message is durable. -t takes recipients from
To/Cc/Bcc and removes Bcc, working on the raw bytes.
"""

from __future__ import annotations

import argparse
import getpass
import re
import smtplib
import socket
import sys
import time
from collections.abc import Sequence
from email.utils import formataddr, getaddresses
from typing import Any

from relay import config as config_mod
from relay.errors import SpoolError
from relay.ingress import addresses, content, headers, lanes
from relay.spool.record import Envelope
from relay.spool.spool import Spool

#: sysexits.h codes that sendmail callers understand
EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL, EX_IOERR = 64, 65, 69, 75, 74

_HEADER_END = re.compile(rb"\r?\n(\r?\n)")


def read_message(stream: Any, *, dot_ends: bool) -> bytes:
    """stdin up to EOF, or (without -i) up to a line holding a single dot, in CRLF."""
    lines = []
    for line in stream:
        if dot_ends and line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    data = b"".join(lines)
    # bare LF (how programs write) becomes CRLF; existing CRLF is left alone
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def split_headers(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its folded continuation lines and line ending) and the rest."""
    m = _HEADER_END.search(data)
    head, rest = (data[: m.start(1)], data[m.start(1):]) if m else (data, b"")
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def header_recipients(data: bytes, *, strip_bcc: bool = True) -> tuple[list[str], bytes]:
    """Addresses in To, Cc and Bcc, and the message with its Bcc fields removed."""
    fields, rest = split_headers(data)
    values: list[str] = []
    kept: list[bytes] = []
    for f in fields:
        name, colon, value = f.partition(b":")
        key = name.strip().lower()
        if colon and key in (b"to", b"cc", b"bcc"):
            values.append(re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "replace")).strip())
        if colon and key == b"bcc" and strip_bcc:
            continue
        kept.append(f)
    rcpts = [addr for _, addr in getaddresses(values) if "@" in addr]
    return rcpts, b"".join(kept) + rest if fields else data


def from_address(data: bytes) -> str:
    for f in split_headers(data)[0]:
        name, colon, value = f.partition(b":")
        if colon and name.strip().lower() == b"from":
            found = getaddresses([value.decode("utf-8", "replace")])
            if found and "@" in found[0][1]:
                return found[0][1]
    return ""


#: sendmail options that take a value and mean nothing here: -B body type (8BITMIME),
#: -F full name, -N DSN notify, -R DSN return, -V envelope id, -X traffic log, -L tag
IGNORED_WITH_VALUE = ("-B", "-F", "-N", "-R", "-V", "-X", "-L")
#: and without a value: -bm (deliver mail, the default), -U (initial submission), -m, -em
IGNORED = ("-bm", "-U", "-m", "-n")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """The options daemons pass to /usr/sbin/sendmail, as `relay sendmail` parses them.

    -oi is -i, -f/-r take the sender attached or apart; -o<x> (-oem, -odb, -oi),
    -B8BITMIME, -FCronDaemon and the others in IGNORED_WITH_VALUE are dropped with their
    value, attached or apart, as sendmail itself accepts them.
    """
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag = arg[:2]
        if arg == "-oi":
            out.append("-i")
        elif arg in IGNORED or (flag == "-o" and len(arg) > 2):
            continue
        elif flag in IGNORED_WITH_VALUE:
            if len(arg) == 2:
                next(args, None)  # the value given apart: -B 8BITMIME
        elif flag in ("-f", "-r"):
            out += ["-f", arg[2:] if len(arg) > 2 else next(args, "")]
        else:
            out.append(arg)
    return out


def qualify(address: str, domain: str) -> str:
    """A bare local name (root, www-data) gets @domain, as sendmail gives it @$myhostname."""
    address = address.strip()
    return f"{address}@{domain}" if address and "@" not in address else address


def local_domain(cfg: config_mod.Config) -> str:
    return cfg.sendmail.local_domain or socket.getfqdn()


#: address fields whose bare local names get the local domain (Postfix's cleanup does the
#: same for locally submitted mail: `From: root (Cron Daemon)` becomes root@domain)
ADDRESS_FIELDS = (b"from", b"sender", b"reply-to", b"to", b"cc")


def qualify_headers(data: bytes, domain: str) -> bytes:
    """Bare local names in the address fields get @domain; other fields stay byte for byte."""
    fields, rest = split_headers(data)
    out: list[bytes] = []
    for f in fields:
        name, colon, value = f.partition(b":")
        if colon and name.strip().lower() in ADDRESS_FIELDS:
            pairs = getaddresses([value.decode("utf-8", "replace")])
            if any(addr and "@" not in addr for _, addr in pairs):
                value_text = ", ".join(formataddr((n, qualify(a, domain))) for n, a in pairs if a)
                f = name + b": " + value_text.encode() + b"\r\n"
        out.append(f)
    return b"".join(out) + rest if fields else data


def via_smtp(host: str, port: int, sender: str, rcpts: list[str], data: bytes) -> str | None:
    """Hand the message to the running relay; None when nothing listens (use the spool)."""
    try:
        client = smtplib.SMTP(host, port, timeout=60)
    except (TimeoutError, ConnectionRefusedError, OSError):
        return None
    try:
        client.ehlo("localhost")
        refused = client.sendmail(sender, rcpts, data)  # raises unless some were taken
    finally:
        _quit(client)
    for rcpt, (code, text) in refused.items():
        print(f"relay sendmail: recipient {rcpt} refused: {code} "
              f"{text.decode(errors='replace')}", file=sys.stderr)
    return "smtp-partial" if refused else "smtp"


def accept_locally(cfg: config_mod.Config, sender: str, rcpts: list[str],
                   data: bytes) -> tuple[str, list[str], bytes]:
    """What the SMTP ingress does before its spool write, for a message that bypasses it:
    the same address, content and From rules and size limit, Bcc out, Date/Message-ID in, a Received
    line, and the DKIM signature when dkim.enabled."""
    sender = addresses.sender(sender, allowed_domains=cfg.smtp.allowed_sender_domains)
    rcpts = [addresses.recipient(r) for r in rcpts]
    if len(rcpts) > cfg.smtp.max_recipients:
        raise ValueError(f"{len(rcpts)} recipients, above smtp.max_recipients")
    if len(data) > cfg.smtp.max_message_size:
        raise ValueError(f"message of {len(data)} bytes, above smtp.max_message_size")
    data, refusal = content.inspect(data, allowed_domains=cfg.smtp.allowed_sender_domains,
                                    user=None)
    if refusal is not None:
        raise ValueError(refusal.text)
    hostname = cfg.smtp.hostname or socket.getfqdn()
    now = time.time()
    received = headers.received_line(helo=getpass.getuser(), client="127.0.0.1",
                                     hostname=hostname, protocol="local", now=now)
    data = headers.prepare(data, received=received, hostname=hostname, now=now)
    if cfg.dkim.enabled:
        from relay.ingress.dkim import DkimSigner

        data = DkimSigner(cfg.dkim).sign(data)
    return sender, rcpts, data


def _quit(client: smtplib.SMTP) -> None:
    """Once the relay said 250 the message is its own: a failed QUIT changes nothing."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _complain(message: str, code: int) -> int:
    print(f"relay sendmail: {message}", file=sys.stderr)
    return code


def cmd_sendmail(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    data = read_message(sys.stdin.buffer, dot_ends=not args.i)
    if not data.strip():
        return _complain("no message on stdin", EX_DATAERR)
    domain = local_domain(cfg)
    data = qualify_headers(data, domain)
    rcpts = [qualify(r, domain) for r in args.recipients]
    if args.t:
        found, data = header_recipients(data)
        rcpts = found + [r for r in rcpts if r not in found]
    if not rcpts:
        return _complain("no recipients (name them, or use -t to read To/Cc/Bcc)", EX_USAGE)
    bad = [r for r in rcpts if r.startswith("@") or r.endswith("@")]
    if bad:
        return _complain(f"not an address: {', '.join(bad)}", EX_DATAERR)
    sender = qualify(args.f, domain) or from_address(data) or f"{getpass.getuser()}@{domain}"
    if not any(f.partition(b":")[0].strip().lower() == b"from" for f in split_headers(data)[0]):
        # like sendmail and Postfix's cleanup: a message piped in without From gets the
        # envelope sender's (the relay refuses mail without exactly one From)
        data = f"From: {sender}\r\n".encode() + data
    return _queue(cfg, sender, rcpts, data, verbose=args.verbose)


def _queue(cfg: config_mod.Config, sender: str, rcpts: list[str], data: bytes, *,
           verbose: bool) -> int:
    """Through the running relay, else straight into the spool; the exit status."""
    host = "127.0.0.1" if cfg.smtp.host in ("0.0.0.0", "::", "") else cfg.smtp.host
    try:
        how = via_smtp(host, cfg.smtp.port, sender, rcpts, data) if cfg.smtp.port else None
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(
            exc.smtp_error, bytes) else str(exc.smtp_error)
        hint = ("; set sendmail.local_domain or pass -f"
                if isinstance(exc, smtplib.SMTPSenderRefused) else "")
        return _complain(f"the relay answered {exc.smtp_code} {text} (sender {sender}, "
                         f"recipients {', '.join(rcpts)}){hint}",
                         EX_TEMPFAIL if 400 <= exc.smtp_code < 500 else EX_UNAVAILABLE)
    except (smtplib.SMTPException, OSError) as exc:
        # the relay was reached but the exchange broke: not known to be queued
        return _complain(f"SMTP to {host}:{cfg.smtp.port} failed: {exc}", EX_TEMPFAIL)
    if how is None:
        return _spool_locally(cfg, sender, rcpts, data, verbose=verbose)
    if how == "smtp-partial":
        return EX_DATAERR
    if verbose:
        print(f"queued by the relay at {host}:{cfg.smtp.port}", file=sys.stderr)
    return 0


def _spool_locally(cfg: config_mod.Config, sender: str, rcpts: list[str], data: bytes, *,
                   verbose: bool) -> int:
    """Nothing listens: the ingress's rules here, then Spool.accept (fsynced)."""
    try:
        sender, rcpts, data = accept_locally(cfg, sender, rcpts, data)
        # the lane and SES options as the SMTP ingress decides them (BadSesHeader: refused)
        facts = lanes.Facts(client="127.0.0.1", sender=sender,
                            headers=lanes.header_fields(data))
        lane = lanes.decide(cfg.lanes, facts)
        ses = lanes.ses_options(cfg.lanes, lane, facts)
        data = lanes.strip(data)
    except (addresses.AddressError, ValueError) as exc:
        return _complain(f"{exc} (sender {sender}, recipients {', '.join(rcpts)})", EX_DATAERR)
    spool = Spool(cfg.spool.dir, fsync=cfg.spool.fsync, min_free_bytes=cfg.spool.min_free_bytes)
    try:
        spool.ensure()
        qid = spool.accept(Envelope(sender=sender, recipients=tuple(rcpts),
                                    received_at=time.time(), client="127.0.0.1",
                                    helo=getpass.getuser(), lane=lane, ses=ses), data)
    except (SpoolError, OSError) as exc:
        return _complain(f"cannot queue in {cfg.spool.dir}: {exc}", EX_TEMPFAIL)
    if verbose:
        print(f"queued as {qid} in {spool.root}", file=sys.stderr)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sendmail", parents=[common],
                       help="queue a message read on stdin (sendmail-compatible)")
    p.add_argument("-t", action="store_true", help="recipients from To, Cc, Bcc (Bcc removed)")
    p.add_argument("-i", action="store_true", help="a lone dot does not end the message")
    p.add_argument("-f", default="", metavar="FROM", help="envelope sender")
    p.add_argument("-F", default="", metavar="NAME", help="ignored (full name)")
    p.add_argument("-v", "--verbose", action="store_true", help="say how it was queued")
    p.add_argument("recipients", nargs="*", metavar="RCPT")
    p.set_defaults(func=cmd_sendmail)
