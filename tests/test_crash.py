"""Crash safety: `relay serve` SIGKILLed at random moments under a steady SMTP load.

Every message that got a 250 must reach the sandbox; a recipient may reach it twice only
through a SendEmail call whose answer the relay never recorded (the call in flight at a
kill, design invariant 3), and there are at most kills x max_concurrency of those.
"""

from __future__ import annotations

import json
import random
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from relay.sandbox.server import SandboxState, SandboxThread
from tests.conftest import RelayProcess, relay_sections, wait_for

KILLS = 10
CONCURRENCY = 8
MSGID = re.compile(rb"^Message-ID: <crash-(\d+)@test>", re.M)


class Load(threading.Thread):
    """Sends numbered messages one after another; remembers which got a 250."""

    def __init__(self, relay: RelayProcess) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.stopping = threading.Event()
        self.acked: dict[int, list[str]] = {}
        self.tried = 0

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            rcpts = [f"r{n}@example.net"] + ([f"s{n}@example.org"] if n % 3 == 0 else [])
            data = (f"From: load@example.com\r\nTo: {', '.join(rcpts)}\r\n"
                    f"Subject: crash {n}\r\nMessage-ID: <crash-{n}@test>\r\n\r\n"
                    f"body {n}\r\n").encode()
            self.tried += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.relay.smtp_port, timeout=5) as s:
                    s.sendmail("load@example.com", rcpts, data)
                self.acked[n] = rcpts
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # relay down or killed mid-session: not acknowledged
            time.sleep(0.01)


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    state = SandboxState(max_send_rate=1000, max_24hour_send=-1, latency=0.1)
    with SandboxThread(state) as sb:
        sections = relay_sections(tmp_path, sb.url, admin={"enabled": False},
                                  delivery={"max_concurrency": CONCURRENCY, "max_rate": 500})
        relay = RelayProcess(tmp_path, sections)
        load = Load(relay)
        lines: list[dict] = []
        try:
            relay.start()
            load.start()
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 2.0))
                relay.kill()
                time.sleep(0.2)  # let the log reader see the last lines
                lines += relay.lines
                relay.start()
            time.sleep(1.0)
            load.stopping.set()
            load.join(timeout=30)
            acked = dict(load.acked)

            def delivered() -> Counter[tuple[int, str]]:
                got: Counter[tuple[int, str]] = Counter()
                for call in state.accepted():
                    m = MSGID.search(call.raw)
                    assert m, call.raw[:200]
                    for rcpt in call.recipients:
                        got[(int(m.group(1)), rcpt)] += 1
                return got

            wanted = {(n, r) for n, rcpts in acked.items() for r in rcpts}
            wait_for(lambda: wanted <= set(delivered()), 60)
            wait_for(lambda: not relay.queued("active") and not relay.queued("deferred"), 30)
            assert relay.stop() == 0
            lines += relay.lines
        finally:
            load.stopping.set()
            relay.kill()

    got = delivered()
    missing = wanted - set(got)
    assert not missing, f"seed {seed}: acknowledged but never delivered: {sorted(missing)[:10]}"
    # calls whose SES answer the relay recorded (logged only after the record is saved)
    recorded = {line["ses_message_id"] for line in lines if line.get("event") == "sent"}
    calls = state.accepted()
    unrecorded = [c for c in calls if c.message_id not in recorded]
    duplicates = sum(n - 1 for n in got.values() if n > 1)
    # a recipient is sent again only after a call the relay never recorded
    for key, n in got.items():
        if n > 1:
            seen = [c for c in calls if key[1] in c.recipients
                    and MSGID.search(c.raw) and int(MSGID.search(c.raw).group(1)) == key[0]]
            assert sum(c.message_id in recorded for c in seen) <= 1, (seed, key)
    unrecorded_rcpts = sum(len(c.recipients) for c in unrecorded)
    assert duplicates <= unrecorded_rcpts, (seed, duplicates, unrecorded_rcpts)
    assert len(unrecorded) <= KILLS * CONCURRENCY, (seed, len(unrecorded))
    assert relay.queued("incoming") == []
    assert not list((tmp_path / "spool" / "incoming").iterdir())
    assert relay.queued("failed") == [] and relay.queued("hold") == []
    report = {"seed": seed, "kills": KILLS, "messages_tried": load.tried,
              "acknowledged": len(acked), "recipients_acknowledged": len(wanted),
              "ses_calls": len(calls), "recipient_deliveries": sum(got.values()),
              "duplicates": duplicates, "unrecorded_calls": len(unrecorded),
              "unrecorded_recipients": unrecorded_rcpts,
              "delivered_unacknowledged": len(set(got) - wanted)}
    print("crash-safety:", json.dumps(report))
    assert len(acked) > KILLS  # the load really ran across the kills
