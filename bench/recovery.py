"""Scale: `relay serve` started on a spool of N queued messages; recovery time, peak RSS.

    .venv/bin/python bench/recovery.py [--messages 1000000] [--baseline 10000] [--window 20]

Builds each spool directly with the Spool API (fsync off, in --workers processes). The
messages are small (about 300 bytes): what scales here is files and inodes, not
bytes. Mix: 85% deferred with the next attempt 30-90 minutes ahead, 5% deferred and
already due (the relay was down a while), 8% active (in flight when it stopped), 1% hold,
1% failed, and 100 half-written files in incoming/. Arrivals spread over two days.

Times `relay queue stats` (--no-domains, and the default sampled domain table), then
starts `relay serve` on it (fsync on, the SES sandbox in this process at --rate, admin on
an ephemeral port) and measures from the moment the process is started:
  listening     the relay's "listening" log line
  ready         /readyz answers 200 and SMTP answers 220, then 250 to NOOP
  1st send      the first SendEmail of a message that was in active/ at start
  due moved     every due deferred message is back in active/ (the end of the first
                pass over deferred/: the relay's "deferred_due" log line)
  CPU           the relay's CPU seconds until all three
Then, over --window seconds of sending, the relay's CPU time per recipient sent; then
one /metrics scrape (timed), SIGTERM (time to exit), and peak RSS (VmHWM) from /proc.
One row per spool size (--baseline first); the spools are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_seconds, free_port  # noqa: E402

from relay.sandbox.server import SandboxState, SandboxThread  # noqa: E402
from relay.spool.record import Envelope, State  # noqa: E402
from relay.spool.spool import Spool  # noqa: E402

#: group -> share of the spool; the rest is deferred with the next attempt ahead
MIX = {"active": 0.08, "due": 0.05, "hold": 0.01, "failed": 0.01}
GARBAGE = 100
#: what one message costs on disk: one small file, a block
BYTES_PER_MESSAGE = 4096  # one file of one block per message
BODY = (b"From: app@example.com\r\nTo: someone@example.net\r\nSubject: scale\r\n"
        b"Message-ID: <scale@bench.example>\r\n\r\n" + b"x" * 180 + b"\r\n")


def _fill_range(args: tuple[str, int, int, float]) -> dict[str, int]:
    """Messages lo..hi-1 into the spool at root; returns the count per group."""
    root, lo, hi, now = args
    spool = Spool(root, fsync=False)
    rng = random.Random(lo)
    counts: dict[str, int] = {}
    for i in range(lo, hi):
        born = now - rng.uniform(0, 2 * 86400)
        qid = f"{int(born * 1e6):013X}{i % 0xFFFFF:05X}"
        r, group, edge = rng.random(), "deferred", 0.0
        for name, share in MIX.items():
            edge += share
            if r < edge:
                group = name
                break
        rcpts = tuple(f"u{i}-{k}@d{rng.randrange(40)}.example"
                      for k in range(rng.randint(1, 3)))
        # the sender names the group, so the sandbox tells which kind was sent first
        spool.accept(Envelope(f"{group}@bench.example", rcpts, born), BODY, qid=qid)
        if group == "deferred":
            spool.move(qid, State.ACTIVE, State.DEFERRED, when=now + rng.uniform(1800, 5400))
        elif group == "due":
            spool.move(qid, State.ACTIVE, State.DEFERRED, when=now - rng.uniform(0, 3600))
        elif group == "hold":
            spool.move(qid, State.ACTIVE, State.HOLD)
        elif group == "failed":
            spool.move(qid, State.ACTIVE, State.FAILED)
        counts[group] = counts.get(group, 0) + 1
    return counts


def fill(root: Path, n: int, workers: int) -> dict[str, int]:
    spool = Spool(root, fsync=False)
    spool.ensure()
    now = time.time()
    step = max(1, -(-n // (workers * 8)))
    chunks = [(str(root), lo, min(n, lo + step), now) for lo in range(0, n, step)]
    total: dict[str, int] = {}
    with multiprocessing.Pool(workers) as pool:
        for counts in pool.imap_unordered(_fill_range, chunks):
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
    for k in range(GARBAGE):  # half-written: recovery deletes these
        spool.path(State.INCOMING, f"{k:018X}").write_bytes(BODY[:40])
    return total


def check_room(where: Path, n: int) -> None:
    st = os.statvfs(where)
    need = n * BYTES_PER_MESSAGE
    if st.f_bavail * st.f_frsize < need * 1.2 or st.f_favail < n * 1.2:
        raise SystemExit(f"{where}: not enough room for {n} messages: need about "
                         f"{need / 2**30:.1f} GiB and {3 * n} inodes, have "
                         f"{st.f_bavail * st.f_frsize / 2**30:.1f} GiB and {st.f_favail}")


def run_stats(cfg: Path, *extra: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relay", "queue", "stats", "-c", str(cfg), *extra],
                   check=True, capture_output=True, env=env, timeout=3600)
    return time.perf_counter() - t0


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def _smtp_answers(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as s:
            return s.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _first_call(state: SandboxState, group: str) -> float | None:
    times = [c.arrived for c in state.accepted() if c.sender == f"{group}@bench.example"]
    return min(times) if times else None


def _recipients(state: SandboxState, start: float, end: float) -> int:
    return sum(len(c.recipients) for c in state.accepted() if start <= c.arrived < end)


def serve(root: Path, spool: Path, *, rate: float, window: float,
          deadline: float) -> dict[str, float]:
    """Start `relay serve` on the spool and measure; every time is from process start."""
    state = SandboxState(max_send_rate=rate, max_24hour_send=-1, keep_raw=False)
    with SandboxThread(state) as sb:
        smtp_port, admin_port = free_port(), free_port()
        cfg = root / "relay.toml"
        cfg.write_text(
            f'[smtp]\nport = {smtp_port}\n'
            f'[spool]\ndir = "{spool}"\nmin_free_bytes = 0\n'
            f'[ses]\nendpoint_url = "{sb.url}"\n'
            f'[delivery]\nmax_rate = {rate}\n'
            f'[admin]\nenabled = true\nport = {admin_port}\n')
        env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench")
        log_path = root / "serve.log"
        with open(log_path, "wb") as log:
            t0 = time.time()
            proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
                                    env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=log)
            try:
                out = _watch(proc, state, t0, smtp_port, admin_port, log_path, window,
                             deadline)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=120)
    return out


def _log_times(path: Path, offset: int, out: dict[str, float], t0: float) -> int:
    """Note the times of the relay's listening and first deferred_due lines; returns the
    offset read up to (whole lines only)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "listening":
            out["listening"] = doc["ts"] - t0
        elif doc.get("event") == "deferred_due":
            out.setdefault("due_moved", doc["ts"] - t0)
    return offset + end


def _watch(proc: subprocess.Popen[bytes], state: SandboxState, t0: float, smtp_port: int,
           admin_port: int, log_path: Path, window: float,
           deadline: float) -> dict[str, float]:
    out: dict[str, float] = {}
    stop_at = time.time() + deadline
    admin = f"http://127.0.0.1:{admin_port}"
    offset = 0
    while not {"ready", "first_active", "due_moved"} <= out.keys():
        if proc.poll() is not None:
            raise SystemExit(f"relay serve exited with {proc.returncode}")
        if time.time() > stop_at:
            break
        if "ready" not in out and _get(admin + "/readyz")[0] == 200 and _smtp_answers(smtp_port):
            out["ready"] = time.time() - t0
        first = _first_call(state, "active")
        if first is not None:
            out["first_active"] = first - t0
        offset = _log_times(log_path, offset, out, t0)
        time.sleep(0.02)
    out["cpu_recovery"] = cpu_seconds(proc.pid)
    cpu0, w0 = out["cpu_recovery"], time.time()
    time.sleep(window)
    out["cpu_window"] = cpu_seconds(proc.pid) - cpu0
    out["sent"] = float(_recipients(state, w0, time.time()))
    t = time.perf_counter()
    status, body = _get(admin + "/metrics", timeout=600)
    out["scrape"] = time.perf_counter() - t if status == 200 else float("nan")
    for line in body.decode().splitlines():
        if line.startswith('relay_spool_messages{state="deferred"}'):
            out["deferred_left"] = float(line.split()[-1])
    out["hwm_mb"] = _hwm_kb(proc.pid) / 1024
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out["stop"] = time.perf_counter() - t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--baseline", type=int, default=10_000,
                    help="a small spool measured the same way first (0: none)")
    ap.add_argument("--workers", type=int, default=2, help="processes filling the spool")
    ap.add_argument("--rate", type=float, default=100.0, help="sandbox and relay max rate")
    ap.add_argument("--window", type=float, default=20.0,
                    help="seconds of sending over which CPU is measured")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="stop waiting for ready, 1st send and due moved after this long")
    ap.add_argument("--dir", default=None, help="where to build the spools (default: temp)")
    ap.add_argument("--no-stats", action="store_true", help="skip timing `relay queue stats`")
    args = ap.parse_args()

    sizes = [n for n in (args.baseline, args.messages) if n]
    rows = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"relay-scale-{n}-", dir=args.dir))
        try:
            check_room(root, n)
            t = time.perf_counter()
            counts = fill(root / "spool", n, args.workers)
            filled = time.perf_counter() - t
            print(f"{n}: filled in {filled:.0f} s: {counts}", flush=True)
            cfg = root / "stats.toml"
            cfg.write_text(f'[spool]\ndir = "{root / "spool"}"\n')
            stats = (float("nan"), float("nan")) if args.no_stats else (
                run_stats(cfg, "--no-domains"), run_stats(cfg))
            m = serve(root, root / "spool", rate=args.rate, window=args.window,
                      deadline=args.deadline)
            print(f"{n}: {m}", flush=True)
            rows.append((n, filled, *stats, m))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    nan = float("nan")
    print(f"\nsmall messages; mix {MIX} rest deferred ahead; sandbox and relay at "
          f"{args.rate:g}/s; times in seconds from `relay serve` start\n")
    print(f"{'messages':>9} {'fill':>5} {'stats':>6} {'stats+dom':>9} {'listening':>9} "
          f"{'ready':>6} {'1st send':>8} {'due moved':>9} {'CPU':>5} {'rcpts/window':>12} "
          f"{'CPU ms/rcpt':>11} {'scrape':>7} {'stop':>5} {'peak RSS MB':>11}")
    for n, filled, t_fast, t_dom, m in rows:
        sent = m.get("sent", 0)
        per = m.get("cpu_window", nan) * 1000 / sent if sent else nan
        print(f"{n:>9} {filled:>5.0f} {t_fast:>6.1f} {t_dom:>9.1f} "
              f"{m.get('listening', nan):>9.1f} {m.get('ready', nan):>6.1f} "
              f"{m.get('first_active', nan):>8.1f} {m.get('due_moved', nan):>9.1f} "
              f"{m.get('cpu_recovery', nan):>5.1f} "
              f"{sent:>12.0f} {per:>11.1f} {m.get('scrape', nan):>7.2f} "
              f"{m.get('stop', nan):>5.1f} {m.get('hwm_mb', nan):>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
