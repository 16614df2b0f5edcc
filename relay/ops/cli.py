"""The `relay` command: serve, check, sandbox (and, as they land, queue, suppression...).

Every command takes -c FILE; the default is $RELAY_CONFIG, else conf/relay.toml if
present, else the built-in defaults. Errors name what is wrong and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError

from relay import __version__
from relay import config as config_mod
from relay.config_cores import workers as worker_count
from relay.errors import ConfigError, DeliveryError


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import log, service
    from relay.ops import workers
    from relay.ops.preflight import startup_problems
    from relay.spool.lock import SpoolLocked

    cfg = _load(args)
    workers.check(cfg)
    count = worker_count(cfg)
    if args.worker is None:
        # before recovery, migrations and GetAccount: a relay that cannot start changes nothing
        problems = startup_problems(cfg)
        for problem in problems:
            print(f"relay serve: {problem}", file=sys.stderr)
        if problems:
            return 1
    log.setup(args.log_level)
    try:
        if args.worker is not None:
            if not 0 <= args.worker < count:
                print(f"relay serve: --worker {args.worker}: smtp.workers is {count}",
                      file=sys.stderr)
                return 2
            asyncio.run(service.serve(cfg, worker=(args.worker, count)))
        elif count > 1:
            return workers.supervise(cfg, config_path=args.config, log_level=args.log_level)
        else:
            asyncio.run(service.serve(cfg))
    except SpoolLocked as exc:
        print(f"relay serve: {exc}", file=sys.stderr)
        return 1
    except (OSError, DBAPIError) as exc:
        print(f"relay serve: {start_failure(cfg, exc)}", file=sys.stderr)
        return 1
    return 0


def start_failure(cfg: config_mod.Config, exc: BaseException) -> str:
    """One line for a failure the checks before start-up could not foresee."""
    from relay.store.db import database_url

    first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, DBAPIError):
        url = database_url(cfg.database.url, cfg.spool.dir)
        return (f"database {url.split('@')[-1]}: {first}: check database.url and that the "
                "database is up and writable (relay check)")
    return f"{first}: check the paths and ports in {cfg.source} (relay check)"


def cmd_check(args: argparse.Namespace) -> int:
    from relay.config import SANDBOX
    from relay.ses.client import SesClient

    cfg = _load(args)
    print(f"config: {cfg.source}: ok")
    count = worker_count(cfg)
    print(f"smtp: {cfg.smtp.host}:{cfg.smtp.port}, {count} worker process"
          f"{'es' if count > 1 else ''} (smtp.workers{' = auto' if not cfg.smtp.workers else ''})")
    if not _check_local(cfg):
        return 1
    if cfg.ses.endpoint_url == SANDBOX:
        print("ses: embedded sandbox (no AWS account used)")
        return 0

    async def ask() -> int:
        async with SesClient(cfg.ses) as ses:
            if not ses.has_credentials:
                print("ses: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                      "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the relay a role",
                      file=sys.stderr)
                return 1
            acct = await ses.get_account()
        print(f"ses: region {cfg.ses.region}, endpoint {cfg.ses.endpoint_url or 'AWS'}")
        print(f"  sending enabled: {acct.sending_enabled}  enforcement: {acct.enforcement_status}"
              f"  production access: {acct.production_access}")
        print(f"  max send rate: {acct.max_send_rate}/s  24h quota: {acct.max_24hour_send:.0f}"
              f"  sent last 24h: {acct.sent_last_24hours:.0f}")
        rate = min(acct.max_send_rate, cfg.delivery.max_rate or acct.max_send_rate)
        print(f"  the relay will send at most {rate}/s")
        return 0 if acct.sending_enabled else 1

    try:
        return asyncio.run(ask())
    except DeliveryError as exc:
        print(f"ses: GetAccount failed: {exc}", file=sys.stderr)
        return 1


def _check_local(cfg: config_mod.Config) -> bool:
    """The spool, the ports and the database, as `relay serve` would need them."""
    from relay.ops.preflight import startup_problems
    from relay.store.db import Database

    problems = startup_problems(cfg)
    if not problems:
        async def open_db() -> None:
            db = await Database.open(cfg.database.url, cfg.spool.dir,
                                     lock_timeout=min(cfg.database.lock_timeout, 5.0))
            await db.close()

        try:
            asyncio.run(open_db())
        except (OSError, DBAPIError) as exc:
            problems.append(start_failure(cfg, exc))
    for problem in problems:
        print(f"check: {problem}", file=sys.stderr)
    if not problems:
        print(f"spool: {cfg.spool.dir}: ok; ports: free; database: ok")
    return not problems


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Run only the SES sandbox (for pointing another relay or a test at it)."""
    from pathlib import Path

    from relay.sandbox.server import Sandbox, SandboxState

    async def run() -> None:
        state = SandboxState(outbox=Path(args.dir) if args.dir else None,
                             max_send_rate=args.rate, latency=args.latency, keep_raw=False)
        sb = Sandbox(state)
        url = await sb.start(args.host, args.port)
        print(json.dumps({"event": "sandbox", "url": url}), flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    """Add or replace a user in smtp.auth_file (or --file); the password comes from stdin."""
    import getpass

    from relay.ingress.credentials import set_password

    path = args.file or _load(args).smtp.auth_file
    if not path:
        print("relay passwd: no credentials file: set smtp.auth_file or pass --file",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            print("relay passwd: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    senders = None
    if args.senders is not None:
        senders = tuple(x.strip() for x in args.senders.split(",") if x.strip())
    try:
        new = set_password(path, args.user, password, senders)
    except (ValueError, OSError) as exc:
        print(f"relay passwd: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if new else 'updated'} {args.user} in {path}")
    return 0


#: which configuration every command reads, said in each command's --help
CONFIG_HELP = ("configuration file (TOML); default: $RELAY_CONFIG, else conf/relay.toml if "
               "present, else the built-in defaults")
CONFIG_NOTE = ("Reads the configuration given by -c FILE (accepted anywhere on the command "
               "line), else $RELAY_CONFIG, else conf/relay.toml if present, else the built-in "
               "defaults.")


def describe(parser: argparse.ArgumentParser, text: str) -> None:
    """A command's --help: what it does (the configuration note is added by note_config)."""
    parser.description = text


def subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser below this one, depth first (queue list, queue hold...)."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *subcommands(child)]
    return out


def note_config(parser: argparse.ArgumentParser) -> None:
    """Each subcommand's --help ends its description with the configuration it reads;
    one with no description of its own says what its one-line help says."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, child in action.choices.items():
            text = child.description or helps.get(name, "").capitalize() + "."
            child.description = "\n\n".join(textwrap.fill(t, 79) for t in (text, CONFIG_NOTE))
            child.formatter_class = argparse.RawDescriptionHelpFormatter
            note_config(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="SMTP relay for Amazon SES")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    # SUPPRESS: a -c given before the subcommand is not reset by the subcommand's default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser.set_defaults(config=None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the relay")
    describe(p, "Run the relay: the SMTP listener, the spool's delivery pool sending through "
             "SES, the feedback ingester and the admin listener (/metrics, /healthz, "
             "/readyz), until SIGTERM or SIGINT.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # started by the supervisor when smtp.workers > 1 (relay.ops.workers)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", parents=[common],
                       help="validate the config and ask SES for the account")
    describe(p, "Validate the configuration, check that the spool, ports and database are "
             "usable, and ask SES for the account's sending status and quotas (GetAccount). "
             "Exits non-zero when the relay could not start or send.")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sandbox", parents=[common], help="run only the SES sandbox endpoint")
    describe(p, "Run only the SES sandbox: an HTTP endpoint answering SESv2 like SES does, "
             "for pointing another relay (ses.endpoint_url) or a test at it. Prints its URL "
             "as a JSON line; runs until interrupted.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dir", default="", help="write accepted messages here as .eml files")
    p.add_argument("--rate", type=float, default=14.0, help="MaxSendRate to enforce")
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait per call")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("passwd", parents=[common], help="add or change an SMTP AUTH user")
    describe(p, "Add or replace a user in the SMTP AUTH credentials file (smtp.auth_file, or "
             "--file). The password is asked twice on a terminal, else read as one line "
             "from standard input.")
    p.add_argument("user")
    p.add_argument("--file", help="credentials file (default: smtp.auth_file)")
    p.add_argument("--senders", help="comma list of addresses and @domains the user may "
                   "send as (default: keep; empty string: any)")
    p.set_defaults(func=cmd_passwd)
    from relay.ops import feedback_cli

    feedback_cli.add_parsers(sub, common)

    add_operator_commands(sub, common)
    note_config(parser)
    return parser


def add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                          common: argparse.ArgumentParser) -> None:
    """`relay queue ...` and `relay sendmail`, defined in their own modules."""
    from relay.ingress import sendmail
    from relay.ops import queue_cli

    queue_cli.add_parser(sub, common)
    sendmail.add_parser(sub, common)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.path.basename(sys.argv[0]) == "sendmail" and argv[:1] != ["sendmail"]:
        # installed as /usr/sbin/sendmail (a symlink), called the way daemons call sendmail
        argv = ["sendmail", *argv]
    if argv[:1] == ["sendmail"]:
        from relay.ingress.sendmail import normalize_argv

        argv = ["sendmail", *normalize_argv(argv[1:])]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
