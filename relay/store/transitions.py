"""The message log's status transitions, as pure functions of plain values.

What a delivery outcome (the pool's Listener port) and an SES feedback event change on a
`messages` row: its status, its last error, its attempt count. Touches no table itself:
relay.store.messages, the one writer of `messages`, asks these functions what to write;
tests/unit/test_feedback_decisions.py holds their tables.
"""

from __future__ import annotations

from typing import Any, Literal

#: Delivery outcome kind -> message log status (None: keep the status, note the error).
STATUS_OF: dict[str, str | None] = {
    "sent": "sent",
    "suppressed": "suppressed",
    "rejected": "failed",
    "failed": "failed",
    "expired": "failed",
    "deferred": "deferred",
    "throttled": None,
    "held": None,
}

#: Feedback event kind -> the message log status it sets; kinds not here (send, delay)
#: leave the row alone. A transient bounce and a bounce SES answered from the account's
#: suppression list (OnAccountSuppressionList: SES did not try) have their own statuses:
#: SES counts neither in its bounce rate, and neither does the reputation guard.
FEEDBACK_STATUS = {
    "bounce": "bounced",
    "soft-bounce": "soft-bounced",
    "complaint": "complained",
    "delivery": "delivered",
    "reject": "failed",
    "rendering-failure": "failed",
}

#: How an outcome changes the attempt count: "add" one more, "set" to the spool record's
#: count, "" leave it.
Attempts = Literal["add", "set", ""]


def attempts_of(kind: str) -> Attempts:
    """How a delivery outcome counts attempts: a call SES answered counts one more; a
    deferral takes the spool record's count (which already counted the failed call)."""
    if kind in ("sent", "rejected"):
        return "add"
    return "set" if kind == "deferred" else ""


def after_outcome(kind: str, *, ses_message_id: str, error: str, now: float) -> dict[str, Any]:
    """The columns a delivery outcome sets on a row (status, SES MessageId, sent_at,
    last_error, updated_at); an unknown kind only touches updated_at and the error."""
    values: dict[str, Any] = {"updated_at": now}
    status = STATUS_OF.get(kind)
    if status is not None:
        values["status"] = status
    if ses_message_id:
        values["ses_message_id"] = ses_message_id
    if kind == "sent":
        values["sent_at"] = now
        values["last_error"] = ""
    elif error:
        values["last_error"] = error[:2000]
    return values


#: The bounce subtype SES reports for an address on the account's suppression list.
ON_ACCOUNT_LIST = "OnAccountSuppressionList"
ACCOUNT_LISTED = "ses-suppressed"

#: How the reputation guard reads a sent row's status: "bounce" (a counted permanent
#: bounce), "complaint", "known" (an outcome arrived: judged at once, clean), "excluded"
#: (SES does not count the send: account suppression list, rejected); anything else
#: ("sent") is unknown until feedback.bounce_settle has passed.
OUTCOME_OF_STATUS = {
    "bounced": "bounce",
    "complained": "complaint",
    "delivered": "known",
    "soft-bounced": "known",
    ACCOUNT_LISTED: "excluded",
    "failed": "excluded",
}

#: Statuses a later event of a kind may not replace (events can arrive out of order: a
#: Delivery read after its Complaint must not hide the complaint).
KEEPS: dict[str, tuple[str, ...]] = {
    "delivery": ("bounced", "complained", ACCOUNT_LISTED),
    "soft-bounce": ("bounced", "complained", ACCOUNT_LISTED, "delivered"),
}


def feedback_status(kind: str, detail: str) -> str | None:
    """The status a feedback event gives its row (None: it changes none)."""
    status = FEEDBACK_STATUS.get(kind)
    if status == "bounced" and ON_ACCOUNT_LIST in detail.split(" ", 1)[0]:
        return ACCOUNT_LISTED
    return status


def after_feedback(kind: str, detail: str) -> dict[str, str] | None:
    """The columns a feedback event sets on its row, or None when it changes nothing.

    A delivery keeps the last error (it says what happened before); every other status
    the event sets takes the event's detail as the error. The bounce detail starts with
    "bounceType/bounceSubType" (relay.feedback.parse).
    """
    status = feedback_status(kind, detail)
    if status is None:
        return None
    if status == "delivered":
        return {"status": status}
    return {"status": status, "last_error": detail}
