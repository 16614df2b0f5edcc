"""Rate limiter and quota: never above the rate in any one-second window."""

from __future__ import annotations

import math
import random

import pytest

from relay.delivery.ratelimit import Quota, RateLimiter


def max_in_window(grants: list[tuple[float, int]], width: float = 1.0) -> int:
    best = 0
    for i, (t, _) in enumerate(grants):
        best = max(best, sum(n for u, n in grants[i:] if u < t + width))
    return best


@pytest.mark.parametrize("rate", [1, 7, 14, 50, 200])
@pytest.mark.parametrize("sizes", ["ones", "mixed"])
def test_no_one_second_window_above_the_rate(rate, sizes):
    lim = RateLimiter(rate)
    rng = random.Random(rate)
    grants, now = [], 0.0
    for _ in range(rate * 20):
        cap = lim.capacity(now)
        n = 1 if sizes == "ones" else rng.randint(1, cap)
        t = lim.reserve(n, now)
        assert t >= now
        grants.append((t, n))
        now = t if rng.random() < 0.7 else t + rng.random() * 0.3
    assert max_in_window(grants) <= rate


def test_busy_pacing_reaches_98_percent():
    lim = RateLimiter(50)
    now, grants = 0.0, []
    for _ in range(5000):
        now = lim.reserve(1, now)
        grants.append(now)
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved >= 0.98 * 50
    assert max_in_window([(t, 1) for t in grants]) <= 50


def test_grants_are_paced_not_burst():
    lim = RateLimiter(10)
    times = [lim.reserve(1, 0.0) for _ in range(5)]
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_capacity_is_the_integer_rate_and_oversize_is_refused():
    lim = RateLimiter(14.7)
    assert lim.capacity(0.0) == 14
    with pytest.raises(ValueError):
        lim.reserve(15, 0.0)


def test_throttle_cuts_the_rate_widens_the_guard_and_recovers_slowly():
    lim = RateLimiter(40, recovery_per_second=0.05)
    window = lim.window
    lim.throttled(100.0)
    assert lim.rate(100.0) == pytest.approx(30)
    assert lim.window > window
    lim.throttled(100.0)
    assert lim.rate(100.0) == pytest.approx(22.5)
    assert 22.5 < lim.rate(105.0) < 40
    assert lim.rate(200.0) == pytest.approx(40)
    for _ in range(50):
        lim.throttled(200.0)
    assert lim.rate(200.0) == pytest.approx(4)  # never below a tenth
    assert lim.window <= 1.05 + 1e-9


def test_quota_takes_and_gives_back():
    q = Quota()
    assert q.take(10) == 10  # unknown: unlimited
    q.update(100, 95)
    assert q.take(10) == 5
    q.give_back(5)
    assert q.take(5) == 5 and q.take(1) == 0
    q.update(-1, 0)
    assert q.remaining == math.inf


def test_late_departure_pushes_the_next_call():
    lim = RateLimiter(2, guard=0.0)
    # two calls booked at 0 and 0.5, but the first one actually leaves late, at 0.6
    assert lim.reserve(1, 0.0) == 0.0 and lim.reserve(1, 0.0) == 0.5
    assert lim.depart(1, 0.6) == 0.0
    assert lim.depart(1, 0.61) == 0.0
    t2 = lim.reserve(1, 0.61)
    # a third call may not leave until the late first one is a full window old
    assert lim.depart(1, max(t2, 1.0)) == pytest.approx(0.6, abs=1e-9)
    assert lim.depart(1, 1.6) == 0.0


def test_sandbox_counts_every_window_even_out_of_order():
    from relay.sandbox.server import SandboxState

    st = SandboxState(max_send_rate=3)
    assert st._admit(1, 10.0) is None
    assert st._admit(1, 10.9) is None
    assert st._admit(1, 10.5) is None  # out of order, still 3 in [10.0, 11.0)
    assert st._admit(1, 10.2) is not None  # a 4th inside that second
    assert st._admit(1, 11.0) is None  # [10.5, 11.5) holds 10.5, 10.9, 11.0
    assert st._admit(1, 11.1) is not None  # ... and would hold a 4th
    assert st._admit(1, 11.6) is None  # [10.9, 11.9) holds 10.9, 11.0, 11.6
    assert st.throttles == 2


def test_a_late_account_answer_does_not_hand_back_what_was_sent_meanwhile():
    q = Quota()
    q.update(20, 0)
    assert q.take(3) == 3
    q.sent(3)  # SES confirmed these before the account was asked: in its count
    assert q.take(4) == 4  # in flight when the account is asked
    mark = q.mark()
    assert q.take(2) == 2  # taken while GetAccount was on its way
    q.give_back(1)  # ...one of them not sent after all
    # the answer counts only the 3 confirmed: 4 + 1 more are ours and not in it yet
    q.update(20, 3, mark=mark)
    assert q.remaining == 20 - 3 - 5
    q.sent(5)
    # once nothing is in flight, the next answer counts them all and is taken whole
    mark = q.mark()
    q.update(20, 8, mark=mark)
    assert q.remaining == 12


async def test_account_refresh_keeps_the_sends_made_while_it_waited_for_the_answer():
    import asyncio

    from relay.delivery.account import AccountWatch, Gate
    from relay.delivery.ports import Account
    from relay.delivery.settings import PoolSettings

    asked, answer = asyncio.Event(), asyncio.Event()

    class SlowAccount:
        """GetAccount whose snapshot is taken when asked and arrives when released."""

        def __init__(self) -> None:
            self.sent = 0

        async def get_account(self) -> Account:
            snapshot = self.sent
            asked.set()
            await answer.wait()
            return Account(max_send_rate=10, max_24hour_send=20,
                           sent_last_24hours=snapshot, sending_enabled=True)

    source = SlowAccount()
    quota = Quota()
    watch = AccountWatch(accounts=source, limiter=RateLimiter(10), quota=quota, gate=Gate(),
                         settings=PoolSettings(), on_resume=lambda: None)
    answer.set()
    await watch.refresh()
    assert quota.remaining == 20
    answer.clear()
    asked.clear()
    refreshing = asyncio.ensure_future(watch.refresh())
    await asked.wait()
    for _ in range(6):  # sent while the answer is on its way: SES counts them after
        assert quota.take(1) == 1
        source.sent += 1
        quota.sent(1)
    answer.set()
    await refreshing
    assert quota.remaining == 14
