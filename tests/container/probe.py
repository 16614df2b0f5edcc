"""Loopback probes for check.sh: send one SMTP message, wait for an HTTP status, pick a port.

    probe.py smtp PORT               one message to 127.0.0.1:PORT; prints "CODE TEXT"
                                     of the first refusal or of the final reply to DATA
    probe.py http URL SECONDS [CODE] polls URL until it answers (CODE: with that status);
                                     prints "STATUS BODY"; exit 1 when the time runs out
    probe.py port                    a free TCP port on 127.0.0.1
"""

from __future__ import annotations

import smtplib
import socket
import sys
import time
import urllib.error
import urllib.request

MESSAGE = (b"From: app@example.com\r\nTo: you@example.net\r\nSubject: container check\r\n"
           b"Message-ID: <check@example.com>\r\n\r\nThrough the published port.\r\n")


def smtp(port: int) -> int:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("check.example.com")
            code, text = s.mail("app@example.com")
            if code == 250:
                code, text = s.rcpt("you@example.net")
            if code != 250:
                print(code, text.decode(errors="replace"))
                return 1
            code, text = s.data(MESSAGE)
            print(code, text.decode(errors="replace"))
            return 0 if code == 250 else 1
    except (OSError, smtplib.SMTPException) as exc:
        print("000", f"{type(exc).__name__}: {exc}")
        return 1


def http(url: str, seconds: float, want: int | None) -> int:
    deadline = time.monotonic() + seconds
    last = "000 no answer"
    for _ in range(int(seconds * 4) + 1):
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError as exc:
            status, body = 0, str(exc).encode()
        last = f"{status:03d} {' '.join(body.decode(errors='replace').split())}"
        if status and (want is None or status == want):
            print(last)
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    print(last)
    return 1


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "smtp":
        sys.exit(smtp(int(args[0])))
    if cmd == "http":
        sys.exit(http(args[0], float(args[1]), int(args[2]) if len(args) > 2 else None))
    sys.exit(port())
