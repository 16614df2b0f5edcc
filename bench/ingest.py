"""Ingest benchmark: the relay against Postfix under the same smtp-source load, end to end.

Postfix's smtp-source sends N messages of SIZE bytes over S parallel sessions, a new
connection per message (and again with -d: one kept connection per session), to:

- `relay serve` with its default configuration (one worker per core), and with each
  --variant (section.key=value,...), delivering to a separate `relay sandbox` process that
  answers every SendEmail after --latency seconds with no rate limit;
- a private Postfix instance on loopback relaying to smtp-sink.

Both sides fsync before 250. Per row: accept/s (N / smtp-source's time), e2e/s (N / the
time until the endpoint has every message: the sandbox's SentLast24Hours, or Postfix's
queue empty), the ratios relay/Postfix, and the relay's CPU ms per message (user + system
of the supervisor and its workers from /proc, from the start of the load until the last
message is delivered; the SES endpoint's CPU is shown on its own). Binds 127.0.0.1 only
and stops everything it starts; installs nothing: `apt-get install postfix` (smtp-source,
smtp-sink, postfix) first, and run it as root (Postfix's private instance needs it).

    .venv/bin/python bench/ingest.py [--messages 5000] [--sessions 20] [--size 5000]
        [--variant smtp.workers=1] [--rounds 1] [--skip-postfix]

With --rounds K, Postfix and each relay configuration run K times, alternating, and the
medians follow (the machine's noise shows in the spread of the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common import cpu_seconds, free_port, tree_cpu_seconds, wait_port

ROOT = Path(__file__).resolve().parent.parent
#: Postfix's queue directories that hold mail not yet delivered
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")



def wait_until(done: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit("not every message was delivered within the time allowed")
        time.sleep(0.02)


def smtp_source(port: int, messages: int, sessions: int, size: int, keep: bool) -> None:
    """Send `messages` to 127.0.0.1:port; -d keeps each session's connection."""
    args = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-f", "bench@example.com", "-t", "sink@example.net"]
    if keep:
        args.append("-d")
    out = subprocess.run([*args, f"127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"smtp-source failed: {out.stdout}{out.stderr}")


class Postfix:
    """A private Postfix instance: own config and queue, loopback, relaying to smtp-sink."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "postfix"
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.port = free_port()
        self.sink_port = free_port()
        self.sink: subprocess.Popen[bytes] | None = None
        self.started = False

    def start(self) -> None:
        self.conf.mkdir(parents=True)
        os.chmod(self.dir.parent, 0o755)  # Postfix's own processes must reach their queue
        data = self.dir / "data"
        data.mkdir()
        self.queue.mkdir()
        shutil.chown(data, "postfix", "postfix")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        master = (self.conf / "master.cf").read_text().replace(
            "smtp      inet  n       -       y       -       -       smtpd",
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
        )
        (self.conf / "master.cf").write_text(master)
        (self.conf / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {data}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = bench.localdomain",
            "mydestination =",
            "local_transport = error:local delivery disabled",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "default_process_limit = 200",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0",
            "maillog_file = /dev/null",
            "maillog_file_prefixes = /dev",
            "",
        ]))
        user = ["-u", "postfix"] if os.geteuid() == 0 else []  # smtp-sink drops root
        self.sink = subprocess.Popen(
            ["smtp-sink", *user, "-c", f"127.0.0.1:{self.sink_port}", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_port(self.sink_port, timeout=10)
        except SystemExit:
            self.stop()
            raise
        for verb in ("check", "start"):
            out = subprocess.run(["postfix", "-c", str(self.conf), verb],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                self.stop()
                raise SystemExit(f"postfix {verb} failed (run as root?): {out.stdout}{out.stderr}")
            self.started = self.started or verb == "start"
        wait_port(self.port)

    def queued(self) -> int:
        """Messages in Postfix's queue (not yet handed to smtp-sink)."""
        count = 0
        for name in POSTFIX_QUEUES:
            for _, _, files in os.walk(self.queue / name):
                count += len(files)
        return count

    def stop(self) -> None:
        if self.started:
            subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
            self.started = False
        if self.sink:
            self.sink.terminate()
            _, err = self.sink.communicate(timeout=10)
            self.sink = None
            if err.strip():
                print(f"smtp-sink: {err.decode(errors='replace').strip()}", file=sys.stderr)


class Relay:
    """`relay serve` with the given settings, delivering to a `relay sandbox` process."""

    def __init__(self, tmp: Path, settings: dict[str, dict[str, str]], latency: float) -> None:
        self.tmp = tmp
        self.settings = settings
        self.latency = latency
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.account = ""
        self.log = tmp / "relay.log"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench")
        env = {k: v for k, v in env.items() if not k.startswith("RELAY_")}
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "relay", "sandbox", "--rate", "1000000",
             "--latency", str(self.latency)],
            env=env, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.procs.append(sandbox)
        assert sandbox.stdout is not None
        url = json.loads(sandbox.stdout.readline())["url"]
        self.account = f"{url}/v2/email/account"
        # the defaults but for where to listen, spool and send (and no free-space floor:
        # a temporary directory may sit on a small disk)
        sections: dict[str, dict[str, str]] = {
            "smtp": {"port": str(self.port)},
            "spool": {"dir": json.dumps(str(self.tmp / "spool")), "min_free_bytes": "0"},
            "ses": {"endpoint_url": json.dumps(url)},
            "admin": {"port": "0"},
        }
        for section, values in self.settings.items():
            sections.setdefault(section, {}).update(values)
        cfg = self.tmp / "relay.toml"
        cfg.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
            for name, values in sections.items()))
        # the default log level too: a JSON line per message accepted and per call
        with open(self.log, "wb") as log:
            relay = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
                env=env, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.procs.append(relay)
        try:
            wait_port(self.port)
        except SystemExit:
            print(self.log.read_text()[-2000:], file=sys.stderr)
            raise
        time.sleep(1.0)  # every worker up and listening

    def sent(self) -> int:
        with urllib.request.urlopen(self.account, timeout=10) as resp:
            return int(json.load(resp)["SendQuota"]["SentLast24Hours"])

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: the relay's processes, and the SES endpoint's."""
        return tree_cpu_seconds(self.procs[1].pid), cpu_seconds(self.procs[0].pid)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_relay(settings: dict[str, dict[str, str]], args: argparse.Namespace,
              keep: bool) -> tuple[float, float, float, float]:
    """accept/s, e2e/s, relay CPU ms/msg, endpoint CPU ms/msg."""
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(Path(tmp), settings, args.latency)
        try:
            relay.start()
            cpu0, sb0 = relay.cpu()
            start = time.perf_counter()
            smtp_source(relay.port, n, args.sessions, args.size, keep)
            accepted = time.perf_counter() - start
            wait_until(lambda: relay.sent() >= n)
            delivered = time.perf_counter() - start
            cpu1, sb1 = relay.cpu()
        finally:
            relay.stop()
    return n / accepted, n / delivered, (cpu1 - cpu0) * 1000 / n, (sb1 - sb0) * 1000 / n


def run_postfix(args: argparse.Namespace, keep: bool) -> tuple[float, float]:
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp:
        pf = Postfix(Path(tmp))
        try:
            pf.start()
            start = time.perf_counter()
            smtp_source(pf.port, n, args.sessions, args.size, keep)
            accepted = time.perf_counter() - start
            wait_until(lambda: pf.queued() == 0)
            delivered = time.perf_counter() - start
        finally:
            pf.stop()
    return n / accepted, n / delivered


def parse_variant(text: str) -> dict[str, dict[str, str]]:
    """"smtp.workers=1,spool.fsync=true" -> {"smtp": {"workers": "1"}, ...} (TOML values)."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not (section and name and value):
            raise SystemExit(f"--variant {text!r}: expected section.key=value[,...]")
        value = value.strip()
        if not value.replace(".", "", 1).isdigit() and value not in ("true", "false"):
            value = json.dumps(value)
        out.setdefault(section, {})[name] = value
    return out


def row(name: str, keep: bool, r: dict[str, float]) -> str:
    return (f"{name:<24} {'kept' if keep else 'new':<5} {r['acc']:>11.0f} {r['e2e']:>11.0f} "
            f"{r['pf_acc']:>9.0f} {r['pf_e2e']:>9.0f} {r['acc_ratio']:>8.2f}x "
            f"{r['e2e_ratio']:>8.2f}x {r['cpu']:>10.2f} {r['sb']:>10.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.02,
                        help="seconds the SES endpoint takes per SendEmail (default 0.02)")
    parser.add_argument("--variant", action="append", default=None,
                        help="a relay configuration besides the defaults, as "
                             "section.key=value[,...] (default: smtp.workers=1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run Postfix and every relay config this many times, "
                             "alternating, then print the medians (default 1)")
    parser.add_argument("--skip-postfix", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds: must be 1 or more")
    # a SIGTERM (a timeout) unwinds like ^C: every process started here is stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for tool in ("smtp-source",) + (() if args.skip_postfix else ("smtp-sink", "postfix")):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin"):
            raise SystemExit(f"{tool} not found: apt-get install postfix")
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin"
    variants = [("defaults", {})] + [
        (v, parse_variant(v)) for v in (args.variant if args.variant is not None
                                        else ["smtp.workers=1"])]
    print(f"smtp-source -s {args.sessions} -m {args.messages} -l {args.size}; SES endpoint "
          f"answering after {args.latency * 1000:.0f} ms, no rate limit; {os.cpu_count()} "
          f"cores; fsync before 250 on both sides")
    head = (f"{'relay config':<24} {'conn':<5} {'relay acc/s':>11} {'relay e2e/s':>11} "
            f"{'pf acc/s':>9} {'pf e2e/s':>9} {'acc ratio':>9} {'e2e ratio':>9} "
            f"{'CPU ms/msg':>10} {'SES ms/msg':>10}")
    print(head if args.rounds == 1 else f"round {head}")
    results: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for keep in (False, True):
        for turn in range(args.rounds):
            pf_acc = pf_e2e = float("nan")
            if not args.skip_postfix:
                pf_acc, pf_e2e = run_postfix(args, keep)
            for name, settings in variants:
                acc, e2e, cpu, sb = run_relay(settings, args, keep)
                r = {"acc": acc, "e2e": e2e, "pf_acc": pf_acc, "pf_e2e": pf_e2e,
                     "acc_ratio": acc / pf_acc, "e2e_ratio": e2e / pf_e2e, "cpu": cpu, "sb": sb}
                results.setdefault((name, keep), []).append(r)
                print(row(name, keep, r) if args.rounds == 1
                      else f"{turn + 1:<5} {row(name, keep, r)}", flush=True)
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds (each ratio: the median of the ratios of "
              "runs made back to back)")
        print(head)
        for (name, keep), runs in results.items():
            print(row(name, keep, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    print("conn: new = a connection per message, kept = smtp-source -d. CPU ms/msg: user+sys "
          "of the relay's processes from the first message to the last delivery; SES: the "
          "endpoint's own process (not included).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
