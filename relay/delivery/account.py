"""The account watch and the pause: whether the pool may send, and at what rate.

Gate holds the pauses (each with its reason: SES's, the reputation guard's) and the stop,
which every part of delivery reads.
AccountWatch reads GetAccount through the AccountSource port at start, every
account_refresh, and every pause_probe_interval while paused: it sets the limiter's rate
and the 24-hour quota (this worker's share of them), pauses when SES says sending is
disabled and resumes when it is enabled again. No spool or database access. Built by the
delivery pool; pause() and resume() are also called by the reputation guard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.delivery.ports import Account, AccountSource
from relay.delivery.ratelimit import Quota, RateLimiter
from relay.delivery.settings import PoolSettings
from relay.errors import DeliveryError
from relay.log import event

log = logging.getLogger("relay.delivery")

#: the prefix of every pause the account watch decides (and so may lift by itself)
SES_PAUSE = "SES"
#: who paused: SES (GetAccount, SendingPausedException) or the reputation guard; each
#: pause is lifted only by whoever set it, and mail flows once neither is in force
BY_SES, BY_REPUTATION = "ses", "reputation"


class Gate:
    """Whether delivery may send: not paused (and why it is), not held, not stopping.

    A pause is SES's or the reputation guard's, by name (BY_SES, BY_REPUTATION), each
    with its own reason and lifted only by its own resume: SES enabling sending again
    does not lift the guard's pause, nor the reverse. A hold is the relay's own, by name
    (the spool cannot record results, the database cannot answer): each is lifted only by
    whoever set it, never by an operator's resume.
    """

    def __init__(self) -> None:
        #: who -> reason, for each pause in force
        self.pauses: dict[str, str] = {}
        self.stopping = False
        #: name -> reason, for each hold in force
        self.holds: dict[str, str] = {}
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._unheld = asyncio.Event()
        self._unheld.set()

    @property
    def paused(self) -> bool:
        return bool(self.pauses)

    @property
    def reason(self) -> str:
        """Every pause's reason, "; "-joined ("" when none is in force)."""
        return "; ".join(self.pauses.values())

    @property
    def held(self) -> bool:
        return bool(self.holds)

    @property
    def closed(self) -> bool:
        """Paused, held or stopping: take nothing more, keep what waits queued."""
        return self.paused or self.held or self.stopping

    def pause(self, reason: str, *, by: str = BY_SES) -> None:
        self.pauses[by] = reason
        self._unpaused.clear()

    def resume(self, *, by: str = BY_SES) -> None:
        self.pauses.pop(by, None)
        if not self.pauses:
            self._unpaused.set()

    def hold(self, name: str, reason: str) -> None:
        self.holds[name] = reason
        self._unheld.clear()

    def release(self, name: str) -> None:
        self.holds.pop(name, None)
        if not self.holds:
            self._unheld.set()

    def stop(self) -> None:
        self.stopping = True

    async def wait_unpaused(self) -> None:
        """Until neither paused nor held."""
        while not (self._unpaused.is_set() and self._unheld.is_set()):
            await self._unpaused.wait()
            await self._unheld.wait()


class AccountWatch:
    def __init__(self, *, accounts: AccountSource, limiter: RateLimiter, quota: Quota,
                 gate: Gate, settings: PoolSettings, on_resume: Callable[[], None]) -> None:
        self.accounts = accounts
        self.limiter = limiter
        self.quota = quota
        self.gate = gate
        self.settings = settings
        #: called on every resume: mail left in active/ while paused is read again
        self.on_resume = on_resume
        self.account: Account | None = None
        self._changed = asyncio.Event()

    def pause(self, reason: str, *, by: str = BY_SES) -> None:
        if by not in self.gate.pauses:
            event(log, "paused", level=logging.ERROR, reason=reason, by=by)
        self.gate.pause(reason, by=by)
        if by == BY_SES:
            self._changed.set()

    def resume(self, *, by: str = BY_SES) -> None:
        """Lift the pause `by` set; the other one, if in force, still holds delivery."""
        previous = self.gate.pauses.get(by)
        if previous is not None:
            event(log, "resumed", previous_reason=previous, by=by,
                  still_paused=self.gate.reason if len(self.gate.pauses) > 1 else "")
        self.gate.resume(by=by)
        if not self.gate.paused:
            self.on_resume()

    async def refresh(self) -> None:
        """Read the account; set the rate and quota; pause or resume on SendingEnabled."""
        share = self.settings.partition.share
        max_rate = self.settings.max_rate
        mark = self.quota.mark()
        try:
            account = await self.accounts.get_account()
        except DeliveryError as exc:
            if self.account is None:
                fallback = (max_rate or 1.0) * share
                self.limiter.set_rate(fallback)
                event(log, "account_unknown", level=logging.WARNING, error=str(exc),
                      rate=fallback)
            return
        if account != self.account:
            event(log, "account", max_send_rate=account.max_send_rate,
                  max_24hour_send=account.max_24hour_send,
                  sent_last_24hours=account.sent_last_24hours,
                  sending_enabled=account.sending_enabled,
                  enforcement_status=account.enforcement_status)
        self.account = account
        rate = account.max_send_rate
        if max_rate:
            rate = min(rate, max_rate)
        self.limiter.set_rate(max(rate * share, 0.01))
        self.quota.update(account.max_24hour_send * share, account.sent_last_24hours * share,
                          mark=mark)
        if not account.sending_enabled:
            self.pause(f"{SES_PAUSE} sending is disabled for the account "
                       "(GetAccount SendingEnabled=false)")
        elif BY_SES in self.gate.pauses:
            self.resume(by=BY_SES)

    async def run(self) -> None:
        """Re-read the account every account_refresh; while SES paused, probe more often."""
        while True:
            if BY_SES in self.gate.pauses or self.account is None:
                self._changed.clear()  # the pause that set it is what this probe is for
                await asyncio.sleep(self.settings.pause_probe_interval)
            elif await self._paused_meanwhile():
                continue  # just paused: wait one probe interval before asking
            await self.refresh()

    async def _paused_meanwhile(self) -> bool:
        """Wait account_refresh, or less if SES paused delivery; True if it did."""
        try:
            await asyncio.wait_for(self._changed.wait(), self.settings.account_refresh)
        except TimeoutError:
            pass
        self._changed.clear()
        return BY_SES in self.gate.pauses
