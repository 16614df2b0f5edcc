"""The suppression list: addresses the relay must never mail, and why.

The one writer of `suppressions` and `bounce_counts` (consecutive transient bounces).
The delivery pool's Suppressions port, the RCPT-time check, the verbs behind `relay
suppression ...`, and suppress_many() and the bounce counts (read and written a batch at
a time) for the feedback applier's transaction. Addresses are normalized (trimmed, no
<>, lower-case, IDN as punycode).
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from relay.store.db import BounceCount, Database, Suppression

#: The reasons a row may carry.
BOUNCE, COMPLAINT, SOFT_LIMIT, MANUAL = "bounce", "complaint", "soft-bounce limit", "manual"
REASONS = (BOUNCE, COMPLAINT, SOFT_LIMIT, MANUAL)
CSV_FIELDS = ("address", "reason", "source", "detail", "created_at", "updated_at")
#: the longest `source` the column holds (String(32) in relay.store.db)
SOURCE_MAX = 32


def normalize(address: str) -> str:
    """One spelling per mailbox: trimmed, no <>, lower-case, IDN domain as punycode."""
    addr = address.strip().strip("<>").strip()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    if domain.isascii():
        return addr.lower()  # the idna codec leaves an ASCII domain as it is
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local}@{domain}".lower()


def valid(address: str) -> bool:
    local, at, domain = normalize(address).rpartition("@")
    return bool(at and local and domain and " " not in local and "." in domain)


def outranks(new: str, old: str) -> bool:
    """Whether a row with reason `old` takes reason `new` (pure: tested by table).

    A complaint outranks every other reason (the recipient asked not to be mailed);
    otherwise the first reason stays, whoever adds the address again.
    """
    return new == COMPLAINT and old != COMPLAINT


@dataclass(frozen=True)
class Entry:
    address: str
    reason: str
    source: str
    detail: str
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in CSV_FIELDS}


async def suppress(session: AsyncSession, address: str, *, reason: str, source: str,
                   detail: str = "", now: float | None = None) -> bool:
    """Add or refresh a row inside the caller's transaction; True if it is new."""
    now = time.time() if now is None else now
    addr = normalize(address)
    row = await session.get(Suppression, addr)
    if row is None:
        session.add(Suppression(address=addr, reason=reason, source=source, detail=detail,
                                created_at=now, updated_at=now))
        await session.flush()
        return True
    if outranks(reason, row.reason):
        row.reason, row.source, row.detail = reason, source, detail
    row.updated_at = now
    return False


async def suppress_many(session: AsyncSession, rows: Sequence[tuple[str, str, str]], *,
                        source: str, now: float) -> set[str]:
    """Add or refresh (normalized address, reason, detail) rows, in order, inside the
    caller's transaction with one read and bulk writes; returns the addresses that are new.

    Equivalent to suppress() once per row: a complaint outranks what is there (also an
    earlier row of the same batch); otherwise the first reason stays.
    """
    if not rows:
        return set()
    names = sorted({a for a, _, _ in rows})
    old: dict[str, tuple[str, str, str]] = {}
    for i in range(0, len(names), CHUNK):
        found = await session.execute(select(Suppression.address, Suppression.reason,
                                             Suppression.source, Suppression.detail)
                                      .where(Suppression.address.in_(names[i:i + CHUNK])))
        old.update({a: (r, src, d) for a, r, src, d in found})
    final: dict[str, tuple[str, str, str]] = {}
    for addr, reason, detail in rows:
        have = final.get(addr) or old.get(addr)
        if have is None or outranks(reason, have[0]):
            final[addr] = (reason, source, detail)
        else:
            final[addr] = have
    new = {a for a in final if a not in old}
    if new:
        await session.execute(insert(Suppression), [
            {"address": a, "reason": final[a][0], "source": final[a][1],
             "detail": final[a][2], "created_at": now, "updated_at": now} for a in sorted(new)])
    known = [a for a in final if a in old]
    if known:
        table: Any = Suppression.__table__
        await session.execute(update(table).where(table.c.address == bindparam("a")).values(
            reason=bindparam("r"), source=bindparam("s"), detail=bindparam("d"),
            updated_at=now), [
            {"a": a, "r": final[a][0], "s": final[a][1], "d": final[a][2]} for a in known])
    return new


async def bounce_counts(session: AsyncSession, addresses: Iterable[str]) -> dict[str, int]:
    """The consecutive transient bounces of each address that has any (normalized)."""
    names, out = sorted(set(addresses)), {}
    for i in range(0, len(names), CHUNK):
        rows = await session.execute(select(BounceCount.address, BounceCount.count).where(
            BounceCount.address.in_(names[i:i + CHUNK])))
        out.update({a: int(c) for a, c in rows})
    return out


async def set_bounce_counts(session: AsyncSession, counts: dict[str, int], *,
                            now: float) -> None:
    """Store counts in bulk inside the caller's transaction; 0 forgets the address."""
    gone = sorted(a for a, c in counts.items() if c == 0)
    for i in range(0, len(gone), CHUNK):
        await session.execute(delete(BounceCount).where(BounceCount.address.in_(
            gone[i:i + CHUNK])))
    kept = [{"address": a, "count": c, "updated_at": now} for a, c in counts.items() if c]
    if kept:
        await session.execute(_upsert_count(session.get_bind().dialect.name), kept)


@functools.cache
def _upsert_count(dialect: str) -> Any:
    """INSERT of a bounce count that replaces the count already there (SQLite, PostgreSQL)."""
    from sqlalchemy.dialects import postgresql, sqlite

    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(BounceCount)
    return stmt.on_conflict_do_update(
        index_elements=[BounceCount.address],
        set_={"count": stmt.excluded.count, "updated_at": stmt.excluded.updated_at})


#: The delivery-time check: one SELECT for any number of addresses.
_SUPPRESSED = select(Suppression.address).where(
    Suppression.address.in_(bindparam("addresses", expanding=True)))
#: Addresses per SELECT (SQLite's bound-parameter limit is 999 on old builds).
CHUNK = 500


@dataclass
class _Check:
    """One coalesced lookup: the addresses asked for and the future their hits go to."""

    addresses: set[str]
    done: asyncio.Future[set[str]]


class SuppressionList:
    """Implements relay.delivery.ports.Suppressions over the database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: the lookup gathering addresses; it runs once the one in flight (if any) is done
        self._next: _Check | None = None
        self._runner: asyncio.Task[None] | None = None

    async def suppressed(self, recipients: Sequence[str]) -> set[str]:
        """The recipients (as given) whose normalized address is on the list.

        Exact at the time of the call: the answer comes from a SELECT that starts after
        the call does, so a suppression committed before it is seen. On SQLite that is a
        read on the loop (relay.store.loop_read), answered at once; when it cannot be
        (busy, or PostgreSQL), calls arriving in the same loop iteration, or while a
        SELECT is in flight, share the next SELECT of the async engine.
        """
        by_norm: dict[str, list[str]] = {}
        for rcpt in recipients:
            by_norm.setdefault(normalize(rcpt), []).append(rcpt)
        if not by_norm:
            return set()
        reader = self.db.loop_reader
        if reader is not None:
            found = reader.suppressed(list(by_norm))
            if found is not None:
                return {orig for norm in found for orig in by_norm[norm]}
        check = self._next
        if check is None:
            check = self._next = _Check(set(), asyncio.get_running_loop().create_future())
            if self._runner is None:
                self._runner = asyncio.create_task(self._run(), name="suppression-check")
        check.addresses.update(by_norm)
        # shielded: one caller cancelled must not cancel the others' answer
        hits = await asyncio.shield(check.done)
        return {orig for norm in hits if norm in by_norm for orig in by_norm[norm]}

    async def _run(self) -> None:
        """Run gathered lookups one after the other until none is waiting."""
        try:
            while self._next is not None:
                check, self._next = self._next, None
                try:
                    hits = await self._select(check.addresses)
                except Exception as exc:  # noqa: BLE001 - every caller of this check gets it
                    check.done.set_exception(exc)
                    check.done.exception()  # retrieved: callers that left must not warn
                except BaseException:
                    check.done.cancel()
                    raise
                else:
                    check.done.set_result(hits)
        finally:
            self._runner = None
            if self._next is not None:  # cancelled with callers waiting: they are told
                self._next.done.cancel()
                self._next = None

    async def _select(self, addresses: set[str]) -> set[str]:
        names, hits = sorted(addresses), set[str]()
        async with self.db.engine.connect() as conn:
            for i in range(0, len(names), CHUNK):
                hits.update(await conn.scalars(_SUPPRESSED, {"addresses": names[i:i + CHUNK]}))
        return hits

    async def is_suppressed(self, address: str) -> bool:
        return bool(await self.suppressed([address]))

    async def add(self, address: str, *, reason: str = MANUAL, source: str = "operator",
                  detail: str = "") -> bool:
        async with self.db.session.begin() as s:
            return await suppress(s, address, reason=reason, source=source, detail=detail)

    async def remove(self, address: str) -> bool:
        async with self.db.session.begin() as s:
            res = await s.execute(delete(Suppression).where(
                Suppression.address == normalize(address)))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def entries(self) -> list[Entry]:
        async with self.db.session() as s:
            rows = await s.scalars(select(Suppression).order_by(Suppression.address))
            return [Entry(r.address, r.reason, r.source, r.detail, r.created_at, r.updated_at)
                    for r in rows]

    async def import_rows(self, rows: Iterable[dict[str, str]], *, source: str = "import") -> int:
        """Add every row (address[, reason, detail]) in one transaction; returns new rows."""
        wanted: dict[str, dict[str, str]] = {}
        for row in rows:
            wanted.setdefault(normalize(row["address"]), row)
        added, now, names = 0, time.time(), list(wanted)
        async with self.db.session.begin() as s:
            for i in range(0, len(names), 500):
                chunk = names[i:i + 500]
                existing = {r.address: r for r in await s.scalars(
                    select(Suppression).where(Suppression.address.in_(chunk)))}
                for addr in chunk:
                    row = wanted[addr]
                    reason, detail = row.get("reason") or MANUAL, row.get("detail") or ""
                    old = existing.get(addr)
                    if old is None:
                        s.add(Suppression(address=addr, reason=reason, detail=detail,
                                          source=row.get("source") or source,
                                          created_at=now, updated_at=now))
                        added += 1
                    elif outranks(reason, old.reason):
                        old.reason, old.detail, old.updated_at = reason, detail, now
        return added


def parse_csv(text: str) -> list[dict[str, str]]:
    """Rows from CSV text: a header naming `address` (and optionally reason, source,
    detail), or bare addresses one a line. Raises ValueError naming the line that is wrong
    (also for what the csv module cannot read: an unterminated quote, a huge field); a
    source longer than the column's 32 characters is refused, not cut."""
    try:
        return _check_rows(text)
    except csv.Error as exc:
        raise _unreadable(text, exc) from None


def _unreadable(text: str, exc: csv.Error) -> ValueError:
    """The ValueError for a csv.Error, naming the line where the bad record starts."""
    reader = csv.reader(io.StringIO(text))
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error:
        pass
    hint = " (an unterminated quote?)" if '"' in text else ""
    return ValueError(f"line {start}: cannot read the CSV: {exc}{hint}")


def _check_rows(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    if not lines:
        return []
    first = [c.strip().lower() for c in next(csv.reader([lines[0]]))]
    reader: Iterable[dict[str, str]]
    if "address" in first or "email" in first:
        rows = list(csv.DictReader(io.StringIO(text)))
        reader = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in rows]
        reader = [dict(r, address=r.get("address") or r.get("email", "")) for r in reader]
        start = 2
    else:
        reader = [{"address": (c[0] if c else "").strip()} for c in csv.reader(lines)]
        start = 1
    out = []
    for n, row in enumerate(reader, start):
        if not row.get("address"):
            continue
        if not valid(row["address"]):
            raise ValueError(f"line {n}: not an email address: {row['address']!r}")
        if row.get("reason") and row["reason"] not in REASONS:
            raise ValueError(f"line {n}: unknown reason {row['reason']!r} "
                             f"(one of: {', '.join(REASONS)})")
        if len(row.get("source") or "") > SOURCE_MAX:
            raise ValueError(f"line {n}: source {row['source'][:40]!r}... is longer than "
                             f"{SOURCE_MAX} characters")
        out.append(row)
    return out


def to_csv(entries: Iterable[Entry]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(e.as_dict())
    return buf.getvalue()
