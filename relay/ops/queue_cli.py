"""`relay queue ...`: the operator's view of the spool and the verbs that change it.

list, show, stats read the state directories; retry, hold, release, delete, requeue
rename message files through relay.spool.queue, safely beside a running relay. Long
runs over many messages show progress on stderr when it is a terminal. Registered by
relay.ops.cli.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable
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


def ago(seconds: float | None) -> str:
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


def rcpt_cell(row: dict[str, Any]) -> str:
    """The PEND/RCPT column: recipients still to send of the envelope's total."""
    return f"{row.get('pending', 0)}/{row.get('recipients', 0)}"


def cmd_list(args: argparse.Namespace) -> int:
    q = _queue(args)
    states = [State(args.state)] if args.state else list(STATES)
    older = cli_duration("--older-than", args.older_than) if args.older_than else 0.0
    now = time.time()
    rows = q.entries(states=states, older_than=older, sender=args.sender,
                     recipient=args.recipient, now=now)
    if args.lane:
        rows = (r for r in rows if r.get("lane") == args.lane)
    if not args.json:
        print(f"{'ID':18} {'STATE':8} {'AGE':>5} {'SIZE':>8} {'PEND/RCPT':>9} {'TRIES':>5} "
              f"{'NEXT':>5}  {'LANE':13} SENDER / LAST ERROR")
    n = 0
    for row in rows:
        n += 1
        if args.json:
            print(dumps(row))
            continue
        nxt = row.get("next_attempt")
        print(f"{row['id']:18} {row['state']:8} {ago(row['age']):>5} {row.get('size', 0):>8} "
              f"{rcpt_cell(row):>9} {row.get('attempts', 0):>5} "
              f"{ago(nxt - now) if nxt else '-':>5}  {row.get('lane', '-'):13} "
              f"{row.get('sender') or '<>'}"
              + (f"\n{'':56}{row['last_error']}" if row.get("last_error") else "")
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
    for key in ("id", "state", "path", "read", "size", "attempts", "last_error"):
        if key != "read" or doc.get(key):
            print(f"{key:11} {doc.get(key, '')}")
    print(f"{'age':11} {ago(doc['age'])}")
    if doc.get("next_attempt"):
        print(f"{'next':11} in {ago(max(0.0, doc['next_attempt'] - time.time()))}")
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
        f"{s} {ago(a)}" for s, a in doc["oldest_age"].items() if a))
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


#: the states a verb's --all takes mail from (--state narrows to one of them)
ALL_STATES: dict[str, tuple[State, ...]] = {
    "retry": (State.DEFERRED,),
    "hold": (State.ACTIVE, State.DEFERRED),
    "release": (State.HOLD,),
    "delete": STATES,
    "requeue": (State.DEFERRED, State.HOLD, State.FAILED),
}

_DURATION = re.compile(r"\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)\s*")


def cli_duration(option: str, text: str) -> float:
    """Seconds from a duration with its unit ("30s", "5m", "2h", "1d"); a bare number is
    refused, since `--older-than 2` could mean seconds, minutes or days."""
    if not _DURATION.fullmatch(text):
        raise ConfigError(option, "must be a number with a unit (ms, s, m, h or d), such as "
                          f"30s, 5m, 2h or 1d; got {text!r}")
    return parse_duration(option, text)


def read_ids(lines: Iterable[str]) -> list[str]:
    """Queue ids from standard input (`-`): the first word of each line not indented, so a
    plain list of ids and `relay queue list`'s own table (header, indented last errors
    and the count line skipped) both work."""
    out = []
    for line in lines:
        words = line.split()
        if words and not line[0].isspace() and words[0] not in ("ID", "--"):
            out.append(words[0])
    return out


def all_states(name: str, state: str) -> tuple[State, ...]:
    """The states `name --all` acts on, or the one --state names (one of those)."""
    where = ALL_STATES[name]
    if not state:
        return where
    if State(state) not in where:
        raise QueueError(f"--state {state}: {name} --all applies to "
                         + ", ".join(s.value for s in where))
    return (State(state),)


def _selected(q: Queue, args: argparse.Namespace, name: str) -> list[str] | None:
    """The queue ids a verb acts on: those given (`-`: read from stdin), every one in the
    verb's states with --all, or one lane's (hold: active and deferred mail; release: held
    mail) with --lane. None when --all or --lane finds nothing (nothing to do)."""
    ids: list[str] = list(args.ids)
    lane = getattr(args, "lane", "")
    if sum((bool(ids), bool(lane), args.all)) > 1:
        raise QueueError("give queue ids, --lane or --all, one of them" if lane
                         else "give queue ids or --all, not both")
    if lane:
        where: tuple[State, ...] = (State.HOLD,) if name == "release" else (
            State.ACTIVE, State.DEFERRED)
        ids = lane_ids(q, lane, where)
        if not ids:
            print(f"{name}: no {lane} mail in " + ", ".join(f"{s}/" for s in where),
                  file=sys.stderr)
            return None
        return ids
    if args.all:
        where = all_states(name, args.state)
        ids = [qid for state in where for qid in q.all_ids(state)]
        if not ids:
            print(f"{name}: nothing in " + ", ".join(f"{s}/" for s in where), file=sys.stderr)
            return None
        return ids
    if args.state:
        raise QueueError("--state goes with --all")
    if ids == ["-"]:
        ids = read_ids(sys.stdin)
        if not ids:
            print(f"{name}: no queue ids on standard input", file=sys.stderr)
            return None
    elif "-" in ids:
        raise QueueError("`-` (ids on standard input) stands alone")
    if not ids:
        raise QueueError(f"{name}: give one or more queue ids, `-` to read them from "
                         "standard input, or --all")
    return ids


def _confirmed(name: str, count: int, args: argparse.Namespace) -> bool:
    """--all, and delete of anything, asks on the terminal unless --yes; never assumes a
    yes from a pipe (nor when the ids themselves came on standard input)."""
    if args.yes or not (args.all or name == "delete"):
        return True
    if args.ids == ["-"] or not sys.stdin.isatty():
        raise QueueError(f"{name}: {count} message(s): refusing without --yes "
                         "(standard input is not a terminal)")
    what = "for good" if name == "delete" else "now"
    answer = input(f"{name} {count} message(s) {what}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print(f"{name}: nothing done", file=sys.stderr)
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


def _verb(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        q = _queue(args)
        ids = _selected(q, args, name)
        if ids is None:
            return 0
        if not _confirmed(name, len(ids), args):
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
    qp = sub.add_parser("queue", parents=[common],
                        help="inspect and change the spool (safe while serving)")
    qp.description = ("Inspect and change the spool's messages, safely while `relay serve` "
                      "runs: every change is one rename of a message's file.")
    qs = qp.add_subparsers(dest="queue_command", required=True)
    states = [s.value for s in STATES]

    p = qs.add_parser("list", parents=[common], help="one line per message")
    p.description = ("One line per message: id, state, age, size, recipients still pending "
                     "of the total (PEND/RCPT), attempts, time to the next attempt, lane, "
                     "sender, and the last error indented below.")
    p.add_argument("--state", choices=states)
    p.add_argument("--older-than", default="",
                   help="duration with its unit: 90s, 30m, 2h, 1d")
    p.add_argument("--sender", default="", help="address, or @domain")
    p.add_argument("--recipient", default="", help="address, or @domain")
    p.add_argument("--lane", default="", help="only this lane's mail")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_guard(cmd_list))

    p = qs.add_parser("show", parents=[common], help="one message in full")
    p.description = ("One message in full: envelope, each recipient's result, attempts, last "
                     "error and the main headers.")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_show))

    p = qs.add_parser("stats", parents=[common], help="counts by state and age (qshape)")
    p.description = ("Counts by state and age bucket (qshape's, in minutes), messages by "
                     "lane, and the top recipient domains of deferred mail.")
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
        ("retry", "deferred mail due now (the replay)"),
        ("hold", "keep messages from delivery until released"),
        ("release", "held messages back to delivery"),
        ("delete", "remove messages for good (asks unless --yes)"),
        ("requeue", "back through delivery as if just received"),
    )
    for name, text in verbs:
        where = ", ".join(f"{s}/" for s in ALL_STATES[name])
        p = qs.add_parser(name, parents=[common], help=text)
        p.description = (f"{text[0].upper()}{text[1:]}. Takes queue ids, `-` to read them "
                         f"from standard input (one a line), or --all (every message in "
                         f"{where}); --all{' and any delete' if name == 'delete' else ''} "
                         "asks first on a terminal and needs --yes otherwise.")
        p.add_argument("ids", nargs="*", metavar="ID", help="queue ids, or - for stdin")
        p.add_argument("--all", action="store_true", help=f"every message in {where}")
        p.add_argument("--state", default="", choices=[s.value for s in ALL_STATES[name]],
                       help="with --all: only this state")
        if name in ("hold", "release"):
            p.add_argument("--lane", default="",
                           help="every message of this lane (hold: a lane paused by hand)")
        p.add_argument("--yes", action="store_true", help="do not ask")
        p.add_argument("--json", action="store_true")
        p.add_argument("-v", "--verbose", action="store_true", help="a line per message")
        p.set_defaults(func=_guard(_verb(name)))
