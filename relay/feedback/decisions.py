"""What one feedback event does to its recipient, as a pure function of plain values.

decide(): which suppression reason to record and with what detail, and what the count of
consecutive transient bounces becomes. Which reason a listed address keeps is
relay.store.suppression.outranks; the log row's change is relay.store.transitions. Touches
no table; called by relay.feedback.applier; tables in tests/unit/test_feedback_decisions.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.store.suppression import BOUNCE, COMPLAINT, SOFT_LIMIT

#: Event kinds whose decision depends on the address's consecutive transient bounces:
#: the applier reads the count only for these.
COUNTED = frozenset({"soft-bounce"})


@dataclass(frozen=True)
class Decision:
    #: the suppression reason to record, "" for none
    suppress: str = ""
    #: the detail recorded with it
    detail: str = ""
    #: the consecutive transient bounces after this event: None leaves the count alone,
    #: 0 forgets it
    bounces: int | None = None


def decide(kind: str, *, detail: str, bounces: int = 0, soft_bounce_limit: int) -> Decision:
    """The effect of one event of `kind` on its recipient.

    bounces: the recipient's consecutive transient bounces before this event (read only
    for the kinds in COUNTED). A permanent bounce or a complaint suppresses at once; a
    transient bounce counts, and suppresses when the count reaches the limit; a delivery
    ends the run of transient bounces. Nothing else (send, delay, reject, rendering
    failure) touches the suppression list.
    """
    if kind == "bounce":
        return Decision(BOUNCE, detail)
    if kind == "complaint":
        return Decision(COMPLAINT, detail)
    if kind == "soft-bounce":
        count = bounces + 1
        if count >= soft_bounce_limit:
            return Decision(SOFT_LIMIT, f"{soft_bounce_limit} consecutive transient bounces; "
                                        f"last: {detail}", bounces=count)
        return Decision(bounces=count)
    if kind == "delivery":
        return Decision(bounces=0)
    return Decision()
