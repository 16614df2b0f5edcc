"""Retry policy: backoff bounds, jitter, lifetime."""

from __future__ import annotations

import random

import pytest

from relay.delivery.retry import RetryPolicy

P = RetryPolicy(min_backoff=300, max_backoff=4000, max_lifetime=5 * 86400)


@pytest.mark.parametrize(
    "attempts, ceiling", [(1, 600), (2, 1200), (3, 2400), (4, 4000), (10, 4000), (1000, 4000)]
)
def test_ceiling_doubles_up_to_max(attempts, ceiling):
    assert P.ceiling(attempts) == ceiling


def test_delay_is_jittered_between_floor_and_ceiling():
    rng = random.Random(7)
    delays = [P.delay(3, rng) for _ in range(2000)]
    assert min(delays) >= 300 and max(delays) <= 2400
    assert max(delays) - min(delays) > 1500  # spread, not lockstep


@pytest.mark.parametrize(
    "received, now, expected",
    [(0, 100, "retry"), (0, 5 * 86400 - 1, "clamped"), (0, 5 * 86400, None), (0, 6 * 86400, None)],
)
def test_next_attempt_never_passes_the_lifetime(received, now, expected):
    nxt = P.next_attempt(1, received, now, random.Random(1))
    if expected is None:
        assert nxt is None
    elif expected == "clamped":
        assert nxt == received + P.max_lifetime
    else:
        assert 100 + 300 <= nxt <= 100 + 600
