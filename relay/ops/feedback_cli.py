"""Operator commands on the database: `relay suppression ...`, `relay log`, `relay resume`.

suppression list [--json] | add ADDR [--reason R] | remove ADDR | import CSV | export |
sync (imports SES's account-level suppression list, ListSuppressedDestinations, paged);
log ADDRESS (every message row and feedback event for the address, newest first);
resume (writes relay_state "resumed_at"; a running relay's reputation guard polls it).
Each opens the database of the -c config (migrating an older schema) and refuses an SQLite
database that does not exist: an operator command never creates one. Registered by
relay.ops.cli.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay import config as config_mod
from relay.store.db import Database, database_url
from relay.store.suppression import MANUAL, REASONS, SuppressionList, parse_csv, to_csv, valid


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def missing_store(url: str, spool_dir: str | Path) -> str:
    """Why an operator command must not open the database, or "": an SQLite database
    (the default, relay.db in spool.dir) that does not exist yet would be created empty,
    and an empty answer from it ("nothing logged") would look like the truth."""
    full = database_url(url, spool_dir)
    if not full.startswith("sqlite") or full.endswith(":memory:"):
        return ""
    path = Path(full.split(":///", 1)[1]) if ":///" in full else None
    if path is None:
        return ""
    where = "database.url" if url else "database.url unset: relay.db in spool.dir"
    if not url and not Path(spool_dir).is_dir():
        return f"no spool at {Path(spool_dir).resolve()} (spool.dir); has the relay run here?"
    if not path.is_file():
        return f"no database at {path} ({where}); has the relay run here?"
    return ""


def _run(args: argparse.Namespace,
         body: Callable[[Database, config_mod.Config], Awaitable[int]]) -> int:
    cfg = config_mod.load(args.config)
    problem = missing_store(cfg.database.url, cfg.spool.dir)
    if problem:
        return _err(problem)

    async def main() -> int:
        db = await Database.open(cfg.database.url, cfg.spool.dir)
        try:
            return await body(db, cfg)
        finally:
            await db.close()

    return asyncio.run(main())


def _err(msg: str) -> int:
    print(f"relay: {msg}", file=sys.stderr)
    return 1


#: one `relay suppression` action: (the list, the arguments, the config) -> exit status
_Action = Callable[[SuppressionList, argparse.Namespace, config_mod.Config], Awaitable[int]]


async def _list(sl: SuppressionList, args: argparse.Namespace, cfg: config_mod.Config) -> int:
    entries = await sl.entries()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=1))
    else:
        for e in entries:
            print(f"{e.address}\t{e.reason}\t{e.source}\t{_fmt(e.updated_at)}\t{e.detail}")
        print(f"{len(entries)} suppressed", file=sys.stderr)
    return 0


async def _add(sl: SuppressionList, args: argparse.Namespace, cfg: config_mod.Config) -> int:
    if not valid(args.address):
        return _err(f"not an email address: {args.address!r}")
    new = await sl.add(args.address, reason=args.reason, detail=args.detail)
    print(f"{'added' if new else 'already suppressed'}: {args.address}")
    return 0


async def _remove(sl: SuppressionList, args: argparse.Namespace, cfg: config_mod.Config) -> int:
    if not await sl.remove(args.address):
        return _err(f"not on the suppression list: {args.address}")
    print(f"removed: {args.address}")
    return 0


async def _export(sl: SuppressionList, args: argparse.Namespace, cfg: config_mod.Config) -> int:
    sys.stdout.write(to_csv(await sl.entries()))
    return 0


async def _sync_action(sl: SuppressionList, args: argparse.Namespace,
                       cfg: config_mod.Config) -> int:
    return await _sync(sl, cfg)


def _importer(rows: list[dict[str, str]]) -> _Action:
    async def run(sl: SuppressionList, args: argparse.Namespace, cfg: config_mod.Config) -> int:
        added = await sl.import_rows(rows)
        print(f"imported {len(rows)} addresses ({added} new)")
        return 0
    return run


def _read_csv(path: str) -> tuple[list[dict[str, str]], str]:
    """The rows of an import file, or the reason it cannot be read (before any database)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_csv(fh.read()), ""
    except OSError as exc:
        return [], f"cannot read {path}: {exc.strerror}"
    except ValueError as exc:
        return [], f"{path}: {exc}"


_ACTIONS: dict[str, _Action] = {
    "list": _list, "add": _add, "remove": _remove, "export": _export, "sync": _sync_action,
}


def cmd_suppression(args: argparse.Namespace) -> int:
    if args.action == "import":
        rows, error = _read_csv(args.csv)
        if error:
            return _err(error)
        action = _importer(rows)
    else:
        action = _ACTIONS[args.action]

    async def body(db: Database, cfg: config_mod.Config) -> int:
        return await action(SuppressionList(db), args, cfg)

    return _run(args, body)


async def _sync(sl: SuppressionList, cfg: config_mod.Config) -> int:
    from relay.config import SANDBOX
    from relay.errors import DeliveryError
    from relay.ses.client import SesClient

    if cfg.ses.endpoint_url == SANDBOX:
        return _err("ses.endpoint_url is the embedded sandbox, which runs inside `relay serve`; "
                    "point ses.endpoint_url at a running sandbox or SES")
    rows: list[dict[str, str]] = []
    try:
        async with SesClient(cfg.ses) as ses:
            async for address, reason in ses.suppressed_destinations():
                rows.append({"address": address, "detail": f"SES account list: {reason}",
                             "reason": "complaint" if reason == "COMPLAINT" else "bounce"})
    except DeliveryError as exc:
        return _err(f"ListSuppressedDestinations failed: {exc}")
    added = await sl.import_rows(rows, source="ses-account")
    print(f"SES account suppression list: {len(rows)} addresses ({added} new)")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from relay.store.messages import MessageLog

    async def body(db: Database, cfg: config_mod.Config) -> int:
        lines = await MessageLog(db).history(args.address)
        if args.json:
            print(json.dumps([line.__dict__ for line in lines], indent=1))
            return 0
        if not lines:
            print(f"nothing logged for {args.address}", file=sys.stderr)
            return 1
        for line in lines:
            what = {"message": f"queue {line.queue_id}", "event": "SES event"}.get(
                line.kind, "suppressed")
            print(f"{_fmt(line.at)}  {line.status:<18} {what}  ses {line.ses_message_id or '-'}"
                  f"  {line.detail}".rstrip())
        return 0

    return _run(args, body)


def cmd_resume(args: argparse.Namespace) -> int:
    from relay.feedback.guard import REASON_PREFIX, request_resume

    async def body(db: Database, cfg: config_mod.Config) -> int:
        await request_resume(db)
        print("resume requested: a relay paused by its reputation guard "
              f"(reason starting {REASON_PREFIX!r}) resumes within feedback.guard_interval "
              f"({cfg.feedback.guard_interval:g}s) and counts only feedback from now on")
        return 0

    return _run(args, body)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("suppression", parents=[common], help="the suppression list")
    p.description = ("The suppression list: addresses the relay never sends to (hard "
                     "bounces, complaints, and those added by hand), kept in the relay's "
                     "database, which must exist (the relay creates it when it starts).")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("list", parents=[common], help="every suppressed address")
    a.description = ("Every suppressed address with its reason, source, time and detail, "
                     "tab separated; the count on stderr.")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("add", parents=[common], help="suppress an address")
    a.description = "Suppress an address: the relay sends it no more mail until removed."
    a.add_argument("address")
    a.add_argument("--reason", default=MANUAL, choices=REASONS)
    a.add_argument("--detail", default="")
    a = acts.add_parser("remove", parents=[common], help="stop suppressing an address")
    a.description = "Stop suppressing an address: the relay sends it mail again."
    a.add_argument("address")
    a = acts.add_parser("import", parents=[common], help="add addresses from a CSV file")
    a.description = ("Add addresses from a CSV file: a header naming `address` (optionally "
                     "`reason`, `detail`), as `export` writes it, or bare addresses one a line.")
    a.add_argument("csv")
    a = acts.add_parser("export", parents=[common], help="write the list as CSV to stdout")
    a.description = "Write the whole list as CSV to standard output (`import` reads it back)."
    a = acts.add_parser("sync", parents=[common],
                        help="import SES's account-level suppression list")
    a.description = ("Import SES's account-level suppression list (ListSuppressedDestinations, "
                     "page by page) into the relay's own.")
    p.set_defaults(func=cmd_suppression)

    p = sub.add_parser("log", parents=[common], help="what happened to mail for an address")
    p.description = ("What happened to mail for an address: every message and SES event "
                     "logged for it, newest first (logs elsewhere show addresses hashed).")
    p.add_argument("address")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("resume", parents=[common],
                       help="resume delivery paused by the reputation guard")
    p.description = ("Resume delivery paused by the reputation guard: a running relay "
                     "resumes within feedback.guard_interval and counts only feedback from "
                     "now on.")
    p.set_defaults(func=cmd_resume)
