"""SMTP AUTH credentials: a text file of salted scrypt hashes, and `relay passwd USER`.

One line per user, `#` starts a comment:
    USER:scrypt$N$r$p$SALT$HASH[:SENDERS]
SALT and HASH are base64; SENDERS (optional) is a comma list of addresses and
`@domain`s the user may send as. The file (smtp.auth_file) is read again whenever its
mtime changes. Read by relay.ingress.server; written by the CLI (atomic rename).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from relay.errors import ConfigError

#: scrypt cost: 16 MB of memory and about 50 ms of CPU per check
N, R, P = 2**14, 8, 1
_DUMMY_SALT = b"relay-dummy-salt"


@dataclass(frozen=True)
class User:
    name: str
    hash: str
    senders: tuple[str, ...] = ()

    def may_send_as(self, address: str) -> bool:
        """No list means any sender; else the address or its @domain must be listed."""
        if not self.senders:
            return True
        addr = address.lower()
        domain = "@" + addr.rpartition("@")[2]
        return any(s.lower() in (addr, domain) for s in self.senders)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY = hash_password("relay-dummy", salt=_DUMMY_SALT)


def parse(text: str, *, source: str = "smtp.auth_file") -> dict[str, User]:
    users: dict[str, User] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("scrypt$"):
            raise ConfigError(source, f"line {lineno}: expected USER:scrypt$...[:SENDERS]")
        senders = tuple(s.strip() for s in parts[2].split(",") if s.strip()) if parts[2:] else ()
        users[parts[0]] = User(parts[0], parts[1], senders)
    return users


def format_user(user: User) -> str:
    line = f"{user.name}:{user.hash}"
    return line + (":" + ",".join(user.senders) if user.senders else "")


class Credentials:
    """The users of smtp.auth_file, reloaded when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime = -1.0
        self.users: dict[str, User] = {}
        self.reload()

    def reload(self) -> None:
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            self.users = parse(self.path.read_text())
            self._mtime = mtime

    def verify(self, name: str, password: str) -> User | None:
        """The user if the password is right; the same work is done for unknown users."""
        try:
            self.reload()
        except (OSError, ConfigError):
            pass  # keep the last good list
        user = self.users.get(name)
        ok = check_password(password, user.hash if user else _DUMMY)
        return user if ok and user is not None else None


def set_password(path: str | os.PathLike[str], name: str, password: str,
                 senders: tuple[str, ...] | None = None) -> bool:
    """Add or replace `name` in the file (created mode 0600); True if it was new."""
    if not name or any(c in name for c in ":\n\r#") or name != name.strip():
        raise ValueError(f"user name {name!r} must not be empty or contain ':', '#' or spaces")
    if not password:
        raise ValueError("empty password")
    target = Path(path)
    lines = target.read_text().splitlines() if target.exists() else []
    old = parse("\n".join(lines), source=str(target))
    if senders is None:
        senders = old[name].senders if name in old else ()
    entry = format_user(User(name, hash_password(password), senders))
    new = name not in old
    out = [entry if ln.split(":", 1)[0].strip() == name else ln for ln in lines]
    if new:
        out.append(entry)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=".auth-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(out) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new
