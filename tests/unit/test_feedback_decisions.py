"""Feedback decisions by table: what an event suppresses and why, the soft-bounce count and
its limit, which reason wins on an address already listed, and how feedback and delivery
outcomes change a message log row."""

from __future__ import annotations

import pytest

from relay.feedback.decisions import COUNTED, Decision, decide
from relay.store.suppression import BOUNCE, COMPLAINT, MANUAL, REASONS, SOFT_LIMIT, outranks
from relay.store.transitions import after_feedback, after_outcome, attempts_of

KINDS = ("bounce", "soft-bounce", "complaint", "delivery", "delay", "reject",
         "rendering-failure", "send")


@pytest.mark.parametrize("kind,bounces,limit,decision", [
    ("bounce", 0, 3, Decision(BOUNCE, "d")),
    ("bounce", 2, 3, Decision(BOUNCE, "d")),  # a permanent bounce neither counts nor resets
    ("complaint", 0, 3, Decision(COMPLAINT, "d")),
    ("soft-bounce", 0, 3, Decision(bounces=1)),
    ("soft-bounce", 1, 3, Decision(bounces=2)),
    ("soft-bounce", 2, 3, Decision(SOFT_LIMIT, "3 consecutive transient bounces; last: d",
                                   bounces=3)),
    ("soft-bounce", 5, 3, Decision(SOFT_LIMIT, "3 consecutive transient bounces; last: d",
                                   bounces=6)),  # listed already: the row is refreshed
    ("soft-bounce", 0, 1, Decision(SOFT_LIMIT, "1 consecutive transient bounces; last: d",
                                   bounces=1)),
    ("delivery", 2, 3, Decision(bounces=0)),
    ("delivery", 0, 3, Decision(bounces=0)),
    ("delay", 2, 3, Decision()),
    ("reject", 0, 3, Decision()),
    ("rendering-failure", 0, 3, Decision()),
    ("send", 2, 3, Decision()),
])
def test_decide(kind, bounces, limit, decision):
    assert decide(kind, detail="d", bounces=bounces, soft_bounce_limit=limit) == decision


@pytest.mark.parametrize("kind", KINDS)
def test_only_counted_kinds_read_the_count(kind):
    """The applier reads the count only for COUNTED kinds: no other decision may use it."""
    if kind in COUNTED:
        assert decide(kind, detail="", bounces=0, soft_bounce_limit=9) != decide(
            kind, detail="", bounces=7, soft_bounce_limit=9)
    else:
        assert decide(kind, detail="", bounces=0, soft_bounce_limit=1) == decide(
            kind, detail="", bounces=7, soft_bounce_limit=1)


def run(kinds: str, limit: int = 3) -> tuple[str, int]:
    """Events for one address, one letter each, folded as the applier does: the reason
    the list ends with (first reason kept unless outranked) and the count."""
    names = {"s": "soft-bounce", "b": "bounce", "c": "complaint", "d": "delivery",
             "w": "delay", "x": "send"}
    reason, count = "", 0
    for letter in kinds:
        kind = names[letter]
        d = decide(kind, detail="", bounces=count if kind in COUNTED else 0,
                   soft_bounce_limit=limit)
        if d.bounces is not None:
            count = d.bounces
        if d.suppress and (not reason or outranks(d.suppress, reason)):
            reason = d.suppress
    return reason, count


@pytest.mark.parametrize("kinds,limit,outcome", [
    ("ss", 3, ("", 2)),
    ("sss", 3, (SOFT_LIMIT, 3)),
    ("ssdss", 3, ("", 2)),  # a delivery ends the run: two, then two more
    ("ssdsss", 3, (SOFT_LIMIT, 3)),
    ("swsxs", 3, (SOFT_LIMIT, 3)),  # a delay or a send is not a delivery
    ("s", 1, (SOFT_LIMIT, 1)),
    ("sssb", 3, (SOFT_LIMIT, 3)),  # the first reason stays
    ("bsss", 3, (BOUNCE, 3)),
    ("bc", 3, (COMPLAINT, 0)),  # a complaint outranks a bounce
    ("cb", 3, (COMPLAINT, 0)),
    ("sssc", 3, (COMPLAINT, 3)),
    ("d", 3, ("", 0)),
])
def test_event_sequences(kinds, limit, outcome):
    assert run(kinds, limit) == outcome


@pytest.mark.parametrize("new,old,wins", [
    (COMPLAINT, BOUNCE, True),
    (COMPLAINT, SOFT_LIMIT, True),
    (COMPLAINT, MANUAL, True),
    (COMPLAINT, COMPLAINT, False),
    (BOUNCE, COMPLAINT, False),
    (BOUNCE, MANUAL, False),
    (BOUNCE, SOFT_LIMIT, False),
    (SOFT_LIMIT, BOUNCE, False),
    (MANUAL, BOUNCE, False),  # an operator adding a listed address keeps its reason
    (MANUAL, COMPLAINT, False),
])
def test_which_reason_a_listed_address_keeps(new, old, wins):
    assert outranks(new, old) is wins


def test_no_reason_outranks_itself():
    assert not any(outranks(r, r) for r in REASONS)


@pytest.mark.parametrize("kind,change", [
    ("bounce", {"status": "bounced", "last_error": "why"}),
    ("soft-bounce", {"status": "soft-bounced", "last_error": "why"}),
    ("complaint", {"status": "complained", "last_error": "why"}),
    ("delivery", {"status": "delivered"}),  # keeps what the last error said
    ("reject", {"status": "failed", "last_error": "why"}),
    ("rendering-failure", {"status": "failed", "last_error": "why"}),
    ("delay", None),
    ("send", None),
    ("unknown", None),
])
def test_feedback_changes_the_row(kind, change):
    assert after_feedback(kind, "why") == change


@pytest.mark.parametrize("kind,detail,status", [
    ("bounce", "Permanent/General 5.1.1 smtp; 550 user unknown", "bounced"),
    # SES did not try: its account-level list answered; SES does not count it
    ("bounce", "Permanent/OnAccountSuppressionList 5.1.1", "ses-suppressed"),
    ("soft-bounce", "Transient/MailboxFull 4.2.2", "soft-bounced"),
    # a diagnostic that merely mentions the subtype is still a counted bounce
    ("bounce", "Permanent/General 5.1.1 OnAccountSuppressionList", "bounced"),
])
def test_bounces_the_guard_does_not_count_have_their_own_status(kind, detail, status):
    change = after_feedback(kind, detail)
    assert change is not None and change["status"] == status


@pytest.mark.parametrize("kind,ses_id,error,values,attempts", [
    ("sent", "M1", "old", {"status": "sent", "ses_message_id": "M1", "sent_at": 5.0,
                           "last_error": ""}, "add"),
    ("rejected", "", "no", {"status": "failed", "last_error": "no"}, "add"),
    ("failed", "", "bad", {"status": "failed", "last_error": "bad"}, ""),
    ("expired", "", "late", {"status": "failed", "last_error": "late"}, ""),
    ("suppressed", "", "", {"status": "suppressed"}, ""),
    ("deferred", "", "5xx", {"status": "deferred", "last_error": "5xx"}, "set"),
    ("throttled", "", "slow", {"last_error": "slow"}, ""),  # status kept
    ("held", "", "", {}, ""),
])
def test_delivery_outcome_changes_the_row(kind, ses_id, error, values, attempts):
    assert after_outcome(kind, ses_message_id=ses_id, error=error, now=5.0) == {
        "updated_at": 5.0, **values}
    assert attempts_of(kind) == attempts


def test_a_long_error_is_cut():
    assert len(after_outcome("failed", ses_message_id="", error="x" * 5000,
                             now=0.0)["last_error"]) == 2000
