"""Start-up checks: what would stop `relay serve`, found before it touches anything.

Each problem is one line naming the setting, the path or the port, what is wrong and what
to do. `relay serve` runs the spool, port and database-file checks before recovery,
migrations and GetAccount; `relay check` runs them all and opens the database too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from relay.config import Config
from relay.spool.lock import held_by
from relay.store.db import database_url

PROBE = ".preflight-probe"


def spool_problems(spool_dir: str) -> list[str]:
    """The spool directory exists or can be made, is a directory, and takes a file."""
    root = Path(spool_dir)
    if root.exists() and not root.is_dir():
        return [f"spool.dir {root} is a file, not a directory: move it away or point "
                "spool.dir at a directory"]
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{PROBE}.{os.getpid()}"
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = Path(exc.filename).parent if exc.filename and PROBE in str(exc.filename) \
            else Path(exc.filename or root)
        return [f"spool.dir {root} is not writable ({exc.strerror or exc} at {where}): "
                "make it writable by this user, or point spool.dir elsewhere"]
    return []


def port_problems(config: Config) -> list[str]:
    """Every configured listening address is free (port 0 picks a free one)."""
    out = []
    wanted = [("smtp.port", config.smtp.host, config.smtp.port)]
    if config.smtp.implicit_tls:
        wanted.append(("smtp.tls_port", config.smtp.host, config.smtp.tls_port))
    if config.admin.enabled:
        wanted.append(("admin.port", config.admin.host, config.admin.port))
    for key, host, port in wanted:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                out.append(f"{key} {host}:{port} cannot be used ({exc.strerror or exc}): stop "
                           f"what holds it or choose another {key}")
    return out


def database_file_problems(config: Config) -> list[str]:
    """The SQLite file, when there is one, is a file this user can read and write."""
    url = database_url(config.database.url, config.spool.dir)
    if not url.startswith("sqlite"):
        return []
    path = Path(url.split(":///", 1)[1]) if ":///" in url else None
    if path is None or str(path) == ":memory:":
        return []
    key = "database.url" if config.database.url else "database (spool.dir/relay.db)"
    if path.exists() and not path.is_file():
        return [f"{key}: {path} is not a file: move it away or point database.url at a file"]
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists() and not os.access(name, os.R_OK | os.W_OK):
            return [f"{key}: {name} cannot be read and written by this user: fix its "
                    "permissions (or attributes: lsattr) or point database.url elsewhere"]
    if not path.exists() and path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        return [f"{key}: cannot create {path}: {path.parent} is not writable"]
    return []


def startup_problems(config: Config) -> list[str]:
    """What `relay serve` checks before recovery: ports first, then spool and database."""
    pid = held_by(config.spool.dir)
    if pid is not None:
        # a second relay on this spool: its taken ports are a consequence, not the cause
        return [f"spool {config.spool.dir} is in use by another relay (pid {pid}, or its "
                "worker processes): stop it first, or give this relay a spool.dir of its own"]
    spool = spool_problems(config.spool.dir)
    # the default database lives in the spool: one line for one cause
    return [*port_problems(config), *spool, *([] if spool else database_file_problems(config))]
