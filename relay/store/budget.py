"""The shared rate budget: relays on one PostgreSQL database share the SES account's rate.

Time is cut into slots of 100 ms (wall clock). A relay leases a small block of recipients
for one slot in one short transaction on the `rate_slots` table, under an advisory lock, so
that no eleven consecutive slots (all that a one-second window can touch) hold more than
the rate. A lease is used only inside its slot; what is left expires with it, which is
also how a relay that dies gives its share back. Implements relay.delivery.ratelimit.RateBudget;
built by relay.service when database.url is PostgreSQL and database.shared_rate is on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from relay.log import event
from relay.store.db import LOCK_RATE_BUDGET, Database, RateSlot, xact_lock

log = logging.getLogger("relay.budget")

#: Slots per second: a lease is valid for 1/SLOTS s.
SLOTS = 10
#: A one-second window [a, a + 1) touches at most this many slots.
SPAN = SLOTS + 1
#: How far ahead a lease may be booked (slots).
HORIZON = 30
#: A lease for the current slot needs this much of it left (seconds).
MARGIN = 0.01
#: Seconds between tries while the database cannot be reached.
RETRY = 1.0


def slot_of(t: float) -> int:
    return math.floor(t * SLOTS)


def first_fit(granted: dict[int, int], *, start: int, n: int, want: int,
              rate: int, horizon: int = HORIZON) -> tuple[int, int] | None:
    """The first slot >= start where n more recipients keep every SPAN consecutive slots
    at or below `rate`, and how many (n..want) it can take; None within the horizon."""
    for s in range(start, start + horizon):
        worst = max(sum(granted.get(j + i, 0) for i in range(SPAN))
                    for j in range(s - SPAN + 1, s + 1))
        room = rate - worst
        if room >= n:
            return s, min(want, room)
    return None


class SharedBudget:
    """Leases from the rate_slots table; one lease at a time per relay."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._slot = -1
        self._left = 0
        self._lock = asyncio.Lock()
        self.leases = 0
        self.unavailable = False

    async def take(self, n: int, *, rate: float) -> None:
        async with self._lock:
            while True:
                now = self.clock()
                here = slot_of(now)
                if self._slot == here and self._left >= n and \
                        now < (here + 1) / SLOTS - MARGIN:
                    self._left -= n
                    return
                start = here if now < (here + 1) / SLOTS - MARGIN else here + 1
                per_slot = max(1, math.ceil(rate / SLOTS))
                try:
                    got = await self._lease(start, n=n, want=max(n, per_slot),
                                            rate=max(1, math.floor(rate + 1e-9)))
                except (SQLAlchemyError, OSError) as exc:
                    # without the shared count, sending could exceed the account's rate:
                    # wait for the database instead
                    if not self.unavailable:
                        event(log, "rate_budget_unavailable", level=logging.WARNING,
                              error=str(exc))
                    self.unavailable = True
                    await asyncio.sleep(RETRY)
                    continue
                if self.unavailable:
                    event(log, "rate_budget_available")
                    self.unavailable = False
                if got is None:
                    await asyncio.sleep(HORIZON / SLOTS / 2)
                    continue
                self._slot, self._left = got
                wait = self._slot / SLOTS - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait + 0.001)

    async def _lease(self, start: int, *, n: int, want: int,
                     rate: int) -> tuple[int, int] | None:
        async with self.db.engine.begin() as conn:
            await xact_lock(conn, LOCK_RATE_BUDGET, "slots")
            rows = await conn.execute(select(RateSlot.slot, RateSlot.granted).where(
                RateSlot.slot >= start - SPAN, RateSlot.slot < start + HORIZON + SPAN))
            granted = {int(s): int(g) for s, g in rows}
            fit = first_fit(granted, start=start, n=n, want=want, rate=rate)
            if fit is None:
                return None
            slot, k = fit
            stmt = insert(RateSlot).values(slot=slot, granted=k)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=[RateSlot.slot],
                set_={"granted": RateSlot.granted + stmt.excluded.granted}))
            self.leases += 1
            if self.leases % 100 == 1:
                # slots a minute old count for nothing
                await conn.execute(delete(RateSlot).where(RateSlot.slot < start - 60 * SLOTS))
        return fit


async def shared_budget(db: Database) -> SharedBudget | None:
    """A SharedBudget when the database is PostgreSQL; None (this relay alone) otherwise."""
    if db.engine.dialect.name != "postgresql":
        return None
    event(log, "rate_shared", slots_per_second=SLOTS)
    return SharedBudget(db)


__all__ = ["SLOTS", "SPAN", "SharedBudget", "first_fit", "shared_budget", "slot_of"]
