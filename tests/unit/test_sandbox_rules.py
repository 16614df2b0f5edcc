"""The sandbox's answers as SES gives them: which error a SendEmail call gets, in which
order the checks apply, and when a call counts against the account's rate."""

from __future__ import annotations

import pytest

from relay.sandbox.server import FAULTS, Call, Sandbox, SandboxState, counted_at

ARRIVED = 1_000_000.0


@pytest.mark.parametrize(
    "stamp, at",
    [
        (None, ARRIVED),
        ("", ARRIVED),
        (str(ARRIVED - 0.25), ARRIVED - 0.25),
        (str(ARRIVED - 5.0), ARRIVED - 5.0),
        (str(ARRIVED), ARRIVED),
        (str(ARRIVED - 5.5), ARRIVED),  # too old to be believed
        (str(ARRIVED + 0.1), ARRIVED),  # from the future
        ("yesterday", ARRIVED),
    ],
)
def test_a_call_counts_at_its_departure_unless_the_stamp_is_wild(stamp, at):
    assert counted_at(stamp, ARRIVED) == at


def rcpts(n: int) -> list[str]:
    return [f"r{i}@example.net" for i in range(n)]


@pytest.mark.parametrize(
    "fault, recipients, enabled, error, charged",
    [
        (None, 1, True, None, 1),
        ("ok", 14, True, None, 14),
        ("slow", 2, True, None, 2),
        ("throttle", 1, True, "TooManyRequestsException", 0),
        ("rejected", 0, False, "MessageRejected", 0),  # a scripted fault comes first
        (None, 0, True, "BadRequestException", 0),
        (None, 51, True, "MessageRejected", 0),
        (None, 1, False, "SendingPausedException", 0),
        (None, 0, False, "BadRequestException", 0),  # a bad call is bad even when paused
        (None, 15, True, "TooManyRequestsException", 0),  # over the rate of 14
    ],
)
def test_only_a_valid_call_is_charged_against_the_rate(fault, recipients, enabled, error,
                                                       charged):
    state = SandboxState(max_send_rate=14, sending_enabled=enabled)
    call = Call(at=ARRIVED, arrived=ARRIVED, sender="a@example.com", recipients=rcpts(recipients))
    refused = Sandbox(state).refusal(fault, call)
    assert (refused and refused[1]) == error
    assert state.sent_last_24hours == charged
    if fault in FAULTS:
        assert refused == FAULTS[fault]


def test_the_daily_quota_is_a_throttling_error_and_charges_nothing():
    state = SandboxState(max_send_rate=100, max_24hour_send=10, sent_last_24hours=8)
    call = Call(at=ARRIVED, arrived=ARRIVED, sender="a@example.com", recipients=rcpts(3))
    assert Sandbox(state).refusal(None, call) == (
        400, "ThrottlingException", "Daily message quota exceeded.")
    assert (state.sent_last_24hours, state.quota_exceeded) == (8, 1)
