"""`relay queue ...`: the operator's view of the spool and the verbs that change it.

list, show, stats read the state directories; retry, hold, release, delete, requeue
rename message directories through relay.spool.queue, safely beside a running relay. Long
runs over many messages show progress on stderr when it is a terminal. Registered by
relay.ops.cli.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from relay import config as config_mod
from relay.config_values import parse_duration
from relay.errors import ConfigError
from relay.spool.queue import BUCKET_NAMES, STATES, Queue, QueueError, dumps
from relay.spool.record import State
from relay.spool.spool import Spool

#: deferred envelopes read for the domain table beyond which stats samples evenly
SAMPLE = 20000


def _queue(args: argparse.Namespace) -> Queue:
    cfg = config_mod.load(args.config)
    spool = Spool(cfg.spool.dir, fsync=cfg.spool.fsync)
    if not spool.dir(State.ACTIVE).is_dir():
        raise QueueError(f"no spool at {spool.root} (spool.dir); has the relay run here?")
    return Queue(spool)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


class Progress:
    """A one-line counter on a terminal; silent when stderr is a pipe or a file."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.on = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.on and (done == total or now - self.last > 0.2):
            self.last = now
            sys.stderr.write(f"\r{self.verb}: {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_list(args: argparse.Namespace) -> int:
    q = _queue(args)
    states = [State(args.state)] if args.state else list(STATES)
    older = parse_duration("--older-than", args.older_than) if args.older_than else 0.0
    now = time.time()
    rows = q.entries(states=states, older_than=older, sender=args.sender,
                     recipient=args.recipient, now=now)
    if args.lane:
        rows = (r for r in rows if r.get("lane") == args.lane)
    if not args.json:
        print(f"{'ID':18} {'STATE':8} {'AGE':>5} {'SIZE':>8} {'RCPT':>5} {'TRIES':>5} "
              f"{'NEXT':>5}  {'LANE':13} SENDER / LAST ERROR")
    n = 0
    for row in rows:
        n += 1
        if args.json:
            print(dumps(row))
            continue
        nxt = row.get("next_attempt")
        print(f"{row['id']:18} {row['state']:8} {_ago(row['age']):>5} {row.get('size', 0):>8} "
              f"{row.get('pending', 0)}/{row.get('recipients', 0):<3} {row.get('attempts', 0):>5} "
              f"{_ago(nxt - now) if nxt else '-':>5}  {row.get('lane', '-'):13} "
              f"{row.get('sender') or '<>'}"
              + (f"\n{'':52}{row['last_error']}" if row.get("last_error") else "")
              + (f"  [{row['error']}]" if row.get("error") else ""))
    if not args.json:
        print(f"-- {n} message(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    q = _queue(args)
    doc = q.show(args.id)
    if args.json:
        print(dumps(doc))
        return 0
    for key in ("id", "state", "path", "size", "attempts", "last_error"):
        print(f"{key:11} {doc.get(key, '')}")
    print(f"{'age':11} {_ago(doc['age'])}")
    if doc.get("next_attempt"):
        print(f"{'next':11} in {_ago(max(0.0, doc['next_attempt'] - time.time()))}")
    env = doc.get("envelope", {})
    print(f"{'sender':11} {env.get('sender') or '<>'}")
    print(f"{'lane':11} {env.get('lane', '')}")
    for key, value in env.get("ses", {}).items():
        shown = ", ".join(f"{n}={v}" for n, v in value) if key == "tags" else value
        print(f"{'ses ' + key:11} {shown}")
    results = doc.get("results", {})
    for rcpt in env.get("recipients", []):
        res = results.get(rcpt)
        what = "pending" if res is None else res.get("status", "?")
        extra = (res or {}).get("ses_message_id") or (res or {}).get("reason") or ""
        print(f"{'recipient':11} {rcpt}  {what}  {extra}".rstrip())
    for name, value in doc.get("headers", {}).items():
        print(f"{name + ':':11} {value}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    q = _queue(args)
    doc = q.stats(domains=not args.no_domains, top=args.top,
                  sample=0 if args.exact else SAMPLE)
    if not args.no_lanes:
        doc["lanes"] = lane_table(q, args.lane)
    if args.json:
        print(dumps(doc))
        return 0
    head = f"{'':10}" + "".join(f"{b:>7}" for b in BUCKET_NAMES)
    print(head + "   (age in minutes)")
    for state, counts in doc["states"].items():
        print(f"{state:10}" + "".join(f"{counts[b]:>7}" for b in BUCKET_NAMES))
    print(f"total {doc['total']}; oldest: " + ", ".join(
        f"{s} {_ago(a)}" for s, a in doc["oldest_age"].items() if a))
    if doc.get("lanes"):
        print(f"\n{'lane':16}" + "".join(f"{s.value:>10}" for s in LANE_STATES))
        for lane, counts in sorted(doc["lanes"].items()):
            print(f"{lane[:16]:16}" + "".join(f"{counts[s.value]:>10}" for s in LANE_STATES))
    if doc.get("deferred_domains"):
        sampled = doc.get("deferred_sampled")
        print("\ndeferred recipients by domain" + (
            f" (estimated from {sampled} evenly spread messages; --exact reads all)"
            if sampled else ""))
        print(f"{'':24}" + "".join(f"{b:>7}" for b in BUCKET_NAMES))
        for row in doc["deferred_domains"]:
            print(f"{row['domain'][:24]:24}" + "".join(f"{row[b]:>7}" for b in BUCKET_NAMES))
    return 0


#: the states whose messages the lane table and --lane count (mail still to send)
LANE_STATES = (State.ACTIVE, State.DEFERRED, State.HOLD)


def lane_table(q: Queue, only: str = "") -> dict[str, dict[str, int]]:
    """Messages by lane and state (reads each envelope in active/, deferred/, hold/)."""
    table: dict[str, dict[str, int]] = {}
    for state in LANE_STATES:
        for qid in q.spool.scan(state):
            rec = q.read(state, qid)
            lane = rec.envelope.lane if rec is not None else "?"
            if only and lane != only:
                continue
            row = table.setdefault(lane, {s.value: 0 for s in LANE_STATES})
            row[state.value] += 1
    return table


def lane_ids(q: Queue, lane: str, states: tuple[State, ...]) -> list[str]:
    """The queue ids of one lane's mail in the given states, oldest first."""
    out = []
    for state in states:
        for qid in sorted(q.spool.scan(state)):
            rec = q.read(state, qid)
            if rec is not None and rec.envelope.lane == lane:
                out.append(qid)
    return out


def _selected(q: Queue, args: argparse.Namespace, name: str,
              state_for_all: State | None) -> list[str] | None:
    """The queue ids a verb acts on: those given, every one in a state with --all, or
    one lane's (hold: active and deferred mail; release: held mail) with --lane.

    None when --all or --lane finds nothing (nothing to do, not an error).
    """
    ids: list[str] = list(args.ids)
    lane = getattr(args, "lane", "")
    if lane:
        if ids or getattr(args, "all", False):
            raise QueueError("give queue ids, --all or --lane, one of them")
        where = (State.HOLD,) if name == "release" else (State.ACTIVE, State.DEFERRED)
        ids = lane_ids(q, lane, where)
        if not ids:
            print(f"{name}: no {lane} mail in " + ", ".join(f"{s}/" for s in where),
                  file=sys.stderr)
            return None
        return ids
    if getattr(args, "all", False):
        if ids:
            raise QueueError("give queue ids or --all, not both")
        assert state_for_all is not None
        ids = q.all_ids(state_for_all)
        if not ids:
            print(f"{name}: nothing in {state_for_all.value}/", file=sys.stderr)
            return None
    if not ids:
        raise QueueError(f"{name}: give one or more queue ids"
                         + (" or --all" if state_for_all else ""))
    return ids


def _confirm_delete(count: int) -> bool:
    """Ask on the terminal before deleting for good; never assume a yes from a pipe."""
    if not sys.stdin.isatty():
        raise QueueError("delete: refusing without --yes (stdin is not a terminal)")
    answer = input(f"delete {count} message(s) for good? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print("nothing deleted", file=sys.stderr)
        return False
    return True


def _report(name: str, results: list[tuple[str, str, bool]], args: argparse.Namespace) -> int:
    """A line per message (JSON, failures, or up to 50 successes), a count; 1 if any failed."""
    ok = sum(1 for _, _, good in results if good)
    for qid, what, good in results:
        if args.json:
            print(dumps({"id": qid, "ok": good, "result": what}))
        elif not good:
            print(f"relay queue {name}: {what}", file=sys.stderr)
        elif len(results) <= 50 or args.verbose:
            print(f"{qid}: {what}")
    if not args.json:
        print(f"{name}: {ok} of {len(results)} message(s)", file=sys.stderr)
    return 0 if ok == len(results) else 1


def _verb(name: str, state_for_all: State | None) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        q = _queue(args)
        ids = _selected(q, args, name, state_for_all)
        if ids is None:
            return 0
        if name == "delete" and not args.yes and not _confirm_delete(len(ids)):
            return 1
        results = getattr(q, name)(ids, progress=Progress(name), total=len(ids))
        return _report(name, results, args)
    return run


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (QueueError, ConfigError) as exc:
            if isinstance(exc, ConfigError) and str(exc).startswith("--"):
                print(f"relay queue: {exc}", file=sys.stderr)
                return 2
            if isinstance(exc, ConfigError):
                raise
            print(f"relay queue: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 0
    return run


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    qp = sub.add_parser("queue", help="inspect and change the spool (safe while serving)")
    qs = qp.add_subparsers(dest="queue_command", required=True)
    states = [s.value for s in STATES]

    p = qs.add_parser("list", parents=[common], help="one line per message")
    p.add_argument("--state", choices=states)
    p.add_argument("--older-than", default="", help="duration, e.g. 30m, 2h, 1d")
    p.add_argument("--sender", default="", help="address, or @domain")
    p.add_argument("--recipient", default="", help="address, or @domain")
    p.add_argument("--lane", default="", help="only this lane's mail")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_guard(cmd_list))

    p = qs.add_parser("show", parents=[common], help="one message in full")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_show))

    p = qs.add_parser("stats", parents=[common], help="counts by state and age (qshape)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=10, help="deferred domains to show")
    p.add_argument("--no-domains", action="store_true",
                   help="skip the deferred-domain table (reads no envelope)")
    p.add_argument("--exact", action="store_true",
                   help=f"read every deferred envelope (default: a sample of {SAMPLE})")
    p.add_argument("--lane", default="", help="the lane table for this lane only")
    p.add_argument("--no-lanes", action="store_true",
                   help="skip the lane table (reads no envelope in active/, deferred/, hold/)")
    p.set_defaults(func=_guard(cmd_stats))

    verbs = (
        ("retry", State.DEFERRED, "deferred mail due now (the replay)"),
        ("hold", None, "keep messages from delivery until released"),
        ("release", State.HOLD, "held messages back to delivery"),
        ("delete", None, "remove messages for good (asks unless --yes)"),
        ("requeue", None, "back through delivery as if just received"),
    )
    for name, all_state, text in verbs:
        p = qs.add_parser(name, parents=[common], help=text)
        p.add_argument("ids", nargs="*", metavar="ID")
        if all_state is not None:
            p.add_argument("--all", action="store_true", help=f"every message in {all_state}/")
        if name in ("hold", "release"):
            p.add_argument("--lane", default="",
                           help="every message of this lane (hold: a lane paused by hand)")
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="do not ask")
        p.add_argument("--json", action="store_true")
        p.add_argument("-v", "--verbose", action="store_true", help="a line per message")
        p.set_defaults(func=_guard(_verb(name, all_state)))
