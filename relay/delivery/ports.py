"""The seams between the core and its adapters, as one-verb protocols.

The delivery pool sends through a Sender and reads the account through an AccountSource
(both implemented by relay.ses), asks Suppressions at delivery time (relay.store), and tells
Listeners of each outcome (message log, metrics). The ingress tells a QueuedListener of each
message it queued. Adapters import this module, never the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.spool.record import Envelope, Record, SesOptions


@dataclass(frozen=True)
class Account:
    """What SES GetAccount says of the sending account."""

    max_send_rate: float
    max_24hour_send: float
    sent_last_24hours: float
    sending_enabled: bool
    enforcement_status: str = ""
    production_access: bool = True


class Sender(Protocol):
    async def send_raw(self, *, sender: str, recipients: Sequence[str], raw: bytes,
                       options: SesOptions | None = None) -> str:
        """Send raw MIME to the recipients with the message's SendEmail options; returns
        the SES MessageId."""


class AccountSource(Protocol):
    async def get_account(self) -> Account:
        """The account's quota, rate and sending status."""


class Suppressions(Protocol):
    async def suppressed(self, recipients: Sequence[str]) -> set[str]:
        """The subset of recipients that must not be mailed (checked at delivery time)."""


class Listener(Protocol):
    """Told of every delivery outcome (message log, metrics). Must not raise."""

    async def outcome(
        self,
        kind: str,
        record: Record,
        recipients: Sequence[str],
        *,
        ses_message_id: str = "",
        error: str = "",
    ) -> None:
        """kind: sent, suppressed, rejected, deferred, throttled, held, failed, expired."""


class QueuedListener(Protocol):
    """Told of each message that became durable in active/ (ingress, DSNs). Must not raise
    and must not block: it runs on the loop that answers SMTP."""

    def queued(self, qid: str, envelope: Envelope | None = None, head: bytes | None = None
               ) -> None:
        """`head`: the first bytes of the message, for its header fields (the message log)."""
