"""The ingress's replies as typed values: their wire lines and aiosmtpd's rewritten ones."""

from __future__ import annotations

import dataclasses

import pytest

from relay.ingress import replies
from relay.ingress.replies import NOT_ERRORS, REWRITES, Reply


@pytest.mark.parametrize(("reply", "line"), [
    (replies.OK, "250 2.1.0 Ok"),
    (replies.TOO_BIG, "552 5.3.4 Message too big for system"),
    (replies.AUTH_FAILED, "535 5.7.8 Authentication credentials invalid"),
    # aiosmtpd's wording, without an enhanced status, keeps a single space
    (replies.NEED_RCPT, "503 Error: need RCPT command"),
    (replies.START_DATA, "354 End data with <CR><LF>.<CR><LF>"),
    (replies.queued_as("0001ABC"), "250 2.0.0 Ok: queued as 0001ABC"),
])
def test_reply_lines(reply, line):
    assert str(reply) == reply.line == line


def test_reply_is_frozen_and_compares_by_value():
    assert Reply(250, "2.1.0", "Ok") == replies.OK
    with pytest.raises(dataclasses.FrozenInstanceError):
        replies.OK.code = 251  # type: ignore[misc]


def test_detail_is_added_to_the_text_and_cut_at_200_characters():
    detailed = replies.BAD_SENDER.with_detail("no @")
    assert detailed.line == "553 5.1.7 Bad sender address syntax: no @"
    long = replies.BAD_ADDRESS.with_detail("x" * 500)
    assert len(long.text) == 200 and long.line.startswith("553 5.1.3 Bad recipient")


def test_every_reply_constant_has_a_three_digit_code_and_a_matching_status_class():
    found = [v for v in vars(replies).values() if isinstance(v, Reply)]
    assert len(found) > 25
    for reply in found:
        assert 200 <= reply.code < 600, reply
        assert not reply.status or reply.status[0] == str(reply.code)[0], reply


def test_rewrites_give_aiosmtpd_lines_an_enhanced_status_with_the_same_code():
    for theirs, ours in REWRITES.items():
        assert theirs[:4] == ours[:4] and ours[4:5].isdigit(), (theirs, ours)


def test_recipient_cap_and_421_do_not_count_as_errors():
    assert replies.TOO_MANY_RCPTS.line.startswith(NOT_ERRORS)
    assert replies.TIMEOUT.line.startswith(NOT_ERRORS)
    assert not replies.BAD_ADDRESS.line.startswith(NOT_ERRORS)
