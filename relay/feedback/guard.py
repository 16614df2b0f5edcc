"""The reputation guard: pauses a lane, or the whole account, before SES pauses the account.

Counts each lane's sends in feedback.reputation_window from the message log (one grouped
query over the (sent_at, lane, status) index: a bounce or complaint is on its send's row,
found by SES MessageId, so it counts at the send's time and in the send's lane) and asks
relay.feedback.reputation for the verdict and for how far a lane may run ahead of its
known outcomes. A pause is lasting: written to relay_state (this module is its one
writer: "pause/<lane>", "resume/<lane>", "*" for the account), so a restart stays paused
and every relay on the database obeys, until `relay resume [--lane L]` (request_resume)
starts a new epoch judged on its own at feedback.resume_confidence. Built by relay.service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.config import FeedbackConfig
from relay.delivery.scheduler import Scheduler
from relay.feedback.reputation import (
    ACCOUNT,
    REASON_PREFIX,
    Counts,
    Lines,
    allowance,
    verdict,
)
from relay.log import event
from relay.store.db import Database, MessageRow, StateRow
from relay.store.transitions import OUTCOME_OF_STATUS

log = logging.getLogger("relay.guard")

PAUSE = "pause/"
RESUME = "resume/"


__all__ = ["ACCOUNT", "REASON_PREFIX", "GuardSettings", "ReputationGuard", "Scope",
           "paused_scopes", "read_states", "request_resume", "tally"]


async def read_states(db: Database) -> dict[str, str]:
    """The guard's keys in relay_state: pause/<scope> and resume/<scope>."""
    async with db.session() as s:
        rows = await s.execute(select(StateRow.key, StateRow.value).where(
            StateRow.key.like("pause/%") | StateRow.key.like("resume/%")))
        return {k: v for k, v in rows.all()}


def paused_scopes(states: dict[str, str]) -> dict[str, str]:
    """scope -> reason of every lasting pause."""
    return {k[len(PAUSE):]: v for k, v in states.items() if k.startswith(PAUSE) and v}


async def _write(db: Database, values: dict[str, str], *, unless: tuple[str, str] | None = None
                 ) -> bool:
    """Write keys in one transaction; with `unless` (key, value): only while that key
    still holds that value (a resume meanwhile wins over a pause decided before it)."""
    now = time.time()
    async with db.session.begin() as s:
        if unless is not None:
            row = await s.get(StateRow, unless[0])
            if (row.value if row is not None else "") != unless[1]:
                return False
        for key, value in values.items():
            row = await s.get(StateRow, key)
            if row is None:
                s.add(StateRow(key=key, value=value, updated_at=now))
            else:
                row.value, row.updated_at = value, now
    return True


async def request_resume(db: Database, *, lane: str | None = None,
                         now: float | None = None) -> list[str]:
    """Lift the pause of `lane` (None: of every paused lane and the account) on every
    relay sharing the database; the scopes resumed. Each starts a new epoch: what was sent
    before stays in the history and is no longer judged with what follows."""
    at = repr(time.time() if now is None else now)
    paused = paused_scopes(await read_states(db))
    scopes = [s for s in paused if lane is None or s == lane]
    for scope in scopes:
        await _write(db, {PAUSE + scope: "", RESUME + scope: at})
    return scopes


def _hint(scope: str) -> str:
    return "investigate, then: relay resume" + ("" if scope == ACCOUNT else f" --lane {scope}")


def tally(rows: Sequence[tuple[str, str, bool, int]], *, lanes: Sequence[str],
          default: str) -> dict[str, Counts]:
    """(lane, status, settled, count) rows -> Counts per lane (pure).

    A row with a known outcome is judged; one without (still "sent") is judged once
    settled, else unknown; excluded ones (OnAccountSuppressionList, rejected) not at all.
    A lane no longer configured (or "" from before) counts in the default lane.
    """
    out = {name: Counts() for name in lanes}
    for lane, status, settled, n in rows:
        name = lane if lane in out else default
        outcome = OUTCOME_OF_STATUS.get(status, "")
        if outcome == "excluded":
            continue
        if outcome == "bounce":
            add = Counts(judged=n, bounces=n)
        elif outcome == "complaint":
            add = Counts(judged=n, complaints=n)
        elif outcome or settled:
            add = Counts(judged=n)
        else:
            add = Counts(unknown=n)
        out[name] = out[name] + add
    return out


@dataclass(frozen=True)
class GuardSettings:
    """What the guard needs of [feedback] (relay.config_guard says what each key means)."""

    lane: Lines
    account: Lines
    resume_confidence: float
    bounce_settle: float
    #: 0: lanes are not held back (also when no feedback source can tell outcomes)
    max_unjudged_sends: int
    window: float
    debounce: float
    interval: float
    #: this process's share of the relay's sends (worker processes)
    share: float = 1.0
    #: seconds between full counts of the window; checks between them count only the
    #: sends after the last full count's horizon (a complaint on an older send counts at
    #: the next full count)
    recount: float = 300.0

    @classmethod
    def from_config(cls, f: FeedbackConfig, *, share: float = 1.0, blind: bool = False,
                    **changes: Any) -> GuardSettings:
        """From [feedback]; blind (no SQS queue, no SNS endpoint: no outcome can ever be
        known) the lanes are not held to max_unjudged_sends."""
        return replace(cls(
            lane=Lines(f.max_bounce_rate, f.max_complaint_rate, f.confidence),
            account=Lines(f.account_max_bounce_rate, f.account_max_complaint_rate,
                          f.confidence),
            resume_confidence=f.resume_confidence, bounce_settle=f.bounce_settle,
            max_unjudged_sends=0 if blind else f.max_unjudged_sends,
            window=f.reputation_window, debounce=f.guard_debounce, interval=f.guard_interval,
            share=share), **changes)


@dataclass
class Scope:
    """What the last check found for a lane or the account (for /metrics and /readyz)."""

    counts: Counts = Counts()
    lines: Lines = Lines(0.05, 0.001)
    #: "" or why it is paused
    paused: str = ""
    #: sends it may still make before more outcomes are known (None: no limit)
    allowance: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


class ReputationGuard:
    def __init__(self, *, db: Database, scheduler: Scheduler, pause: Callable[[str], None],
                 resume: Callable[[], None], paused_reason: Callable[[], str],
                 settings: GuardSettings | None = None,
                 unlogged: Callable[[], dict[str, int]] = dict,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.scheduler = scheduler
        #: lane -> sends SES accepted that the message log has not committed yet
        self.unlogged = unlogged
        self.pause = pause
        self.resume = resume
        self.paused_reason = paused_reason
        self.settings = settings or GuardSettings.from_config(FeedbackConfig())
        self.clock = clock
        self.lanes = scheduler.book.names
        self.default = scheduler.book.cfg.default
        #: scope -> what the last check found
        self.scopes: dict[str, Scope] = {s: Scope() for s in (*self.lanes, ACCOUNT)}
        #: seconds the last check took
        self.took = 0.0
        #: epoch key -> (when counted, horizon, counts per lane of the sends before it)
        self._old: dict[float, tuple[float, float, dict[str, Counts]]] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def last(self) -> Counts:
        return self.scopes[ACCOUNT].counts

    async def counts(self, since: dict[str, float], now: float) -> dict[str, Counts]:
        """Counts per scope, each over its own sends since since[scope].

        One grouped query over the index per distinct start (usually one), over the
        recent sends only: what was sent before the last full count's horizon (all of it
        settled then) is taken from that count, redone every settings.recount seconds, so a
        check reads about bounce_settle + recount of sends, not the whole window.
        """
        settled = now - self.settings.bounce_settle
        mono = time.monotonic()
        by_start: dict[float, dict[str, Counts]] = {}
        async with self.db.session() as s:
            for start in sorted(set(since.values())):
                key = self._epoch_key(start, now)
                old = self._old.get(key)
                if old is None or mono - old[0] > self.settings.recount or old[1] < start:
                    horizon = max(start, settled)
                    old = (mono, horizon, await self._range(s, start, horizon, settled))
                    self._old[key] = old
                recent = await self._range(s, old[1], None, settled)
                by_start[start] = {lane: old[2][lane] + recent[lane] for lane in self.lanes}
        for key in set(self._old) - {self._epoch_key(t, now) for t in since.values()}:
            del self._old[key]
        out = {lane: by_start[since[lane]][lane] for lane in self.lanes}
        out[ACCOUNT] = sum(by_start[since[ACCOUNT]].values(), Counts())
        return out

    def _epoch_key(self, start: float, now: float) -> float:
        """The window's start moves with the clock; a resume epoch's does not."""
        return 0.0 if start <= now - self.settings.window else start

    async def _range(self, s: AsyncSession, start: float, end: float | None,
                     settled: float) -> dict[str, Counts]:
        """Counts per lane of the sends in [start, end)."""
        where = [MessageRow.sent_at >= start]
        if end is not None:
            if end <= start:
                return {lane: Counts() for lane in self.lanes}
            where.append(MessageRow.sent_at < end)
        # labelled: PostgreSQL groups by the output column, not a second bound parameter
        old = (MessageRow.sent_at < settled).label("settled")
        rows = await s.execute(
            select(MessageRow.lane, MessageRow.status, old, func.count())
            .where(*where).group_by(MessageRow.lane, MessageRow.status, old))
        return tally([(lane, status, bool(o), int(n)) for lane, status, o, n in rows.all()],
                     lanes=self.lanes, default=self.default)

    async def check(self) -> dict[str, str]:
        """Read the lasting pauses and the counts once; pause what is over its line; the
        pause reason of each paused scope."""
        started = time.monotonic()
        cfg = self.settings
        now = self.clock()
        picked = self._picked_and_logged()
        states = await read_states(self.db)
        start = now - cfg.window
        epochs = {s: float(states.get(RESUME + s) or 0.0) for s in self.scopes}
        since = {s: max(start, at) for s, at in epochs.items()}
        counts = await self.counts(since, now)
        paused = paused_scopes(states)
        for scope, info in self.scopes.items():
            lines = cfg.account if scope == ACCOUNT else cfg.lane
            if epochs[scope] > start:  # resumed: judged on its own, with less evidence
                lines = Lines(lines.bounce, lines.complaint, cfg.resume_confidence)
            info.counts, info.lines = counts[scope], lines
            reason = paused.get(scope, "")
            if not reason:
                reason = verdict(counts[scope], lines, scope=scope)
                if reason and await _write(self.db, {PAUSE + scope: reason},
                                           unless=(RESUME + scope, states.get(RESUME + scope, ""))):
                    self._log_pause(scope, reason, counts[scope])
                else:
                    reason = ""
            if reason and not info.paused and scope in paused:
                # a lasting pause this process had not obeyed yet (at start, another relay)
                event(log, "reputation_paused", level=logging.WARNING, lane=scope,
                      reason=reason, hint=_hint(scope))
            info.paused = reason
            self._apply(scope, reason, picked)
        self.took = time.monotonic() - started
        return {s: i.paused for s, i in self.scopes.items() if i.paused}

    def _picked_and_logged(self) -> dict[str, int]:
        """Per lane, the recipients taken whose sends the counts read next will see.

        Taken from the scheduler's running count, less those not rows of the message log
        yet: in flight (taken, not released) or accepted and waiting in the log's writer.
        Those the counts do not see as unknown are so charged to the lane's allowance (a
        send both in flight and waiting counts twice: the allowance errs low). Read in
        one go, with no await between, so no send is missed between the two."""
        out = dict(self.scheduler.picked)
        for lane, n in self.scheduler.in_flight().items():
            out[lane] = out.get(lane, 0) - n
        for lane, n in self.unlogged().items():
            lane = lane if lane in self.lanes else self.default  # as the counts tally it
            out[lane] = out.get(lane, 0) - n
        return out

    def _log_pause(self, scope: str, reason: str, c: Counts) -> None:
        event(log, "reputation_pause", level=logging.ERROR, lane=scope, reason=reason,
              rate=round(c.bounce_rate, 4), complaint_rate=round(c.complaint_rate, 5),
              sends=c.judged, bounces=c.bounces, complaints=c.complaints, hint=_hint(scope))

    def _apply(self, scope: str, reason: str, picked: dict[str, int]) -> None:
        """Make this process obey the scope's state: pause, resume, the lane's allowance."""
        info = self.scopes[scope]
        if scope == ACCOUNT:
            # the guard's own pause, apart from SES's: set and lifted whatever SES does
            mine = self.paused_reason()
            if reason and mine != reason:
                self.pause(reason)
            elif not reason and mine:
                event(log, "resumed_by_operator", lane=scope)
                self.resume()
            return
        if reason:
            self.scheduler.hold_lane(scope, reason)
            info.allowance = 0
            return
        if scope in self.scheduler.lane_holds:
            event(log, "resumed_by_operator", lane=scope)
        self.scheduler.release_lane(scope)
        cfg = self.settings
        left = allowance(info.counts, info.lines, ahead=cfg.max_unjudged_sends)
        info.allowance = left
        self.scheduler.allow(scope, None if left is None else int(left * cfg.share),
                             picked_before=picked.get(scope, 0))

    def kick(self) -> None:
        """Feedback was applied: check soon (at most once per debounce)."""
        self._kick.set()

    def stats(self) -> dict[str, float]:
        """Per scope: rates, judged sends, lines, pause, allowance (for /metrics)."""
        out: dict[str, float] = {}
        for scope, info in self.scopes.items():
            c, lines = info.counts, info.lines
            name = "account" if scope == ACCOUNT else scope
            out.update({
                f"lane/{name}/bounce_rate": c.bounce_rate,
                f"lane/{name}/complaint_rate": c.complaint_rate,
                f"lane/{name}/judged": float(c.judged),
                f"lane/{name}/unknown": float(c.unknown),
                f"lane/{name}/bounce_line": lines.bounce,
                f"lane/{name}/complaint_line": lines.complaint,
                f"lane/{name}/paused": float(bool(info.paused)),
            })
        return out

    def notes(self) -> list[str]:
        """Paused lanes, for /readyz's body (the relay stays ready: other lanes send)."""
        return [f"lane {s} paused: {i.paused}; mail stays queued; relay resume --lane {s}"
                for s, i in self.scopes.items() if s != ACCOUNT and i.paused]

    async def start(self) -> None:
        # before the pool starts: a relay restarted while paused stays paused
        await self.check()
        self._task = asyncio.create_task(self._run(), name="reputation-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        cfg = self.settings
        while True:
            # a check takes at most a tenth of the time, however large the window
            await asyncio.sleep(max(cfg.debounce, 9 * self.took))
            try:
                async with asyncio.timeout(cfg.interval):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - the guard must keep watching
                event(log, "guard_error", level=logging.WARNING, error=str(exc))
