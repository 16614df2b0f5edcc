"""Spool layouts compared: system calls and CPU per message for the file work alone.

Each message is accepted the way the ingress does it (write under incoming/, a shared
sync, a rename into active/, a shared sync), read back for delivery, then finished (gone
from active/, a shared sync), in batches of --batch messages as concurrent sessions share
a group commit. Layouts:
  spool     relay.spool as it is in the tree given by --tree (default: this one)
  syncfs    the same spool flushing with one syncfs(2), as it does on a filesystem of
            its own, instead of its file and directory syncs
  flat      two flat files per message, <qid>.eml + <qid>.json (the .json renamed last)
  xattr     one file of raw MIME, the record in its user.relay extended attribute
The sketches (flat, xattr) sync like the current spool: an fdatasync per file written, an
fsync per directory changed. System calls come from `strace -c -f` of a run with
--messages N less one with none; CPU and wall time from the best of three runs without
strace (wall time includes waiting for the disk).

    .venv/bin/python bench/spool.py [--messages 2000] [--batch 20] [--size 5120] \
        [--tree /path/to/an/older/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("spool", "syncfs", "flat", "xattr")


def _sync_dirs(*dirs: Path) -> None:
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def _write(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    os.write(fd, data)
    return fd


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def run_syncfs(root: Path, batches: list[list[str]], body: bytes) -> None:
    run_spool(root, batches, body, syncfs=True)


def run_spool(root: Path, batches: list[list[str]], body: bytes, *,
              syncfs: bool | None = None) -> None:
    from relay.spool.record import Envelope, State
    from relay.spool.spool import Spool
    spool = Spool(root)
    if syncfs is not None:
        spool.syncfs = syncfs
    spool.ensure()
    env = Envelope("a@example.com", ("b@example.net",), time.time())
    for batch in batches:
        qids = [spool.prepare(env, body, qid=q) for q in batch]
        spool.flush()
        for q in qids:
            spool.publish(q)
        spool.flush()
        for q in qids:
            rec = spool.load(State.ACTIVE, q)
            spool.read_message(State.ACTIVE, q, rec)
        # as the group commit does: retire (a tree without it: bury), flush, recycle
        retire = getattr(spool, "retire", spool.bury)
        graves = [retire(State.ACTIVE, q) for q in qids]
        spool.flush()
        if hasattr(spool, "recycle"):
            spool.recycle([g for g in graves if g is not None], reuse=True)
            continue
        for grave in graves:
            if grave is not None:
                shutil.rmtree(grave, ignore_errors=True)


def _states(root: Path) -> tuple[Path, Path]:
    inc, act = root / "incoming", root / "active"
    for d in (inc, act):
        d.mkdir(parents=True, exist_ok=True)
    return inc, act


def _record(qid: str, body: bytes) -> bytes:
    return json.dumps({"id": qid, "sender": "a@example.com", "size": len(body)}).encode()


def run_flat(root: Path, batches: list[list[str]], body: bytes) -> None:
    inc, act = _states(root)
    for batch in batches:
        fds = []
        for q in batch:
            rec = _record(q, body)
            fds += [_write(inc / f"{q}.eml", body), _write(inc / f"{q}.json", rec)]
        for fd in fds:
            os.fdatasync(fd)
            os.close(fd)
        for q in batch:
            os.rename(inc / f"{q}.eml", act / f"{q}.eml")
            os.rename(inc / f"{q}.json", act / f"{q}.json")  # the commit point
        _sync_dirs(act)
        for q in batch:
            json.loads(_read(act / f"{q}.json"))
            _read(act / f"{q}.eml")
        for q in batch:
            os.unlink(act / f"{q}.json")
            os.unlink(act / f"{q}.eml")
        _sync_dirs(act)


def run_xattr(root: Path, batches: list[list[str]], body: bytes) -> None:
    inc, act = _states(root)
    for batch in batches:
        fds = []
        for q in batch:
            fd = _write(inc / q, body)
            os.setxattr(fd, "user.relay", _record(q, body))
            fds.append(fd)
        for fd in fds:
            os.fsync(fd)  # the xattr is metadata: fdatasync would not cover it
            os.close(fd)
        for q in batch:
            os.rename(inc / q, act / q)
        _sync_dirs(act)
        for q in batch:
            fd = os.open(act / q, os.O_RDONLY | os.O_CLOEXEC)
            json.loads(os.getxattr(fd, "user.relay"))
            os.read(fd, os.fstat(fd).st_size)
            os.close(fd)
        for q in batch:
            os.unlink(act / q)
        _sync_dirs(act)


def child(layout: str, n: int, batch: int, size: int, where: str) -> None:
    body = (b"x" * 76 + b"\r\n") * max(1, size // 78)
    ids = [f"{i:018X}" for i in range(1, n + 1)]
    batches = [ids[i:i + batch] for i in range(0, n, batch)]
    run = {"spool": run_spool, "syncfs": run_syncfs, "flat": run_flat,
           "xattr": run_xattr}[layout]
    t0, w0 = time.process_time(), time.perf_counter()
    run(Path(where), batches, body)
    print(json.dumps({"cpu": time.process_time() - t0, "wall": time.perf_counter() - w0}))


def measure(layout: str, args: argparse.Namespace, tree: Path, *, strace: bool,
            n: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of a run, or (system calls, 0) under strace."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cmd = [sys.executable, __file__, "--child", layout, "--messages", str(n),
               "--batch", str(args.batch), "--size", str(args.size), "--where", tmp]
        env = dict(os.environ, PYTHONPATH=str(tree))
        if not strace:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            doc = json.loads(out.stdout)
            return float(doc["cpu"]), float(doc["wall"])
        report = Path(tmp) / "strace.txt"
        subprocess.run(["strace", "-c", "-f", "-o", str(report), *cmd], env=env,
                       capture_output=True, text=True, check=True)
        total = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)", report.read_text(), re.M)
        if total is None:
            raise SystemExit(f"no total in strace's report:\n{report.read_text()}")
        return float(total.group(1)), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose relay.spool the 'spool' row uses")
    parser.add_argument("--dir", default=None, help="where the spools go (default: /tmp)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--child", default="")
    parser.add_argument("--where", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.messages, args.batch, args.size, args.where)
        return
    n = args.messages
    print(f"{n} messages of ~{args.size} bytes, group commits of {args.batch}; "
          f"spool row: {args.tree}")
    print(f"{'layout':8} {'syscalls/msg':>13} {'CPU us/msg':>11} {'wall us/msg':>12}")
    for layout in args.layouts.split(","):
        calls = (measure(layout, args, args.tree, strace=True, n=n)[0]
                 - measure(layout, args, args.tree, strace=True, n=0)[0]) / n
        cpu, wall = min(measure(layout, args, args.tree, strace=False, n=n) for _ in range(3))
        print(f"{layout:8} {calls:13.1f} {cpu / n * 1e6:11.0f} {wall / n * 1e6:12.0f}")


if __name__ == "__main__":
    main()
