"""The reputation guard's arithmetic by table: the evidence needed scales with the line.

Pure: relay.feedback.reputation (Clopper-Pearson bounds, verdict, allowance) and
relay.feedback.guard.tally (message log rows -> counts). Counts, never times.
"""

from __future__ import annotations

import random

import pytest

from relay.feedback.guard import tally
from relay.feedback.reputation import (
    Counts,
    Lines,
    allowance,
    betainc,
    lower_bound,
    upper_bound,
    verdict,
)

LANE = Lines(0.05, 0.001, 0.95)
RESUMED = Lines(0.05, 0.001, 0.8)
ACCOUNT = Lines(0.08, 0.004, 0.95)


def first_paused(rate: float, lines: Lines, *, up_to: int, seed: int | None = None) -> int | None:
    """Sends after which a list bouncing at `rate` is first paused (bounces spread evenly,
    or shuffled with `seed`), None if never within `up_to`."""
    if seed is None:
        outcomes = [int((i + 1) * rate) - int(i * rate) for i in range(up_to)]
    else:
        n_bad = round(up_to * rate)
        outcomes = [1] * n_bad + [0] * (up_to - n_bad)
        random.Random(seed).shuffle(outcomes)
    bounces = 0
    for n, bounced in enumerate(outcomes, start=1):
        bounces += bounced
        # with the bounces unchanged, more sends only lower the bound: judge at each bounce
        if bounced and verdict(Counts(judged=n, bounces=bounces), lines):
            return n
    return None


@pytest.mark.parametrize("rate,lines,at_most", [
    (0.08, LANE, 300),     # a bad campaign: stopped within a few hundred sends
    (0.10, LANE, 150),
    (0.30, LANE, 20),      # a small sender is judged after tens
    (0.08, RESUMED, 80),   # a resumed bad lane stops again within tens of sends
    (0.30, RESUMED, 10),
    (0.12, ACCOUNT, 400),  # the account's higher line
])
def test_a_rate_above_the_line_is_paused_after_few_sends(rate, lines, at_most):
    n = first_paused(rate, lines, up_to=5000)
    assert n is not None and n <= at_most, n


@pytest.mark.parametrize("rate,lines", [
    (0.02, LANE), (0.04, LANE), (0.0, LANE), (0.02, RESUMED), (0.05, ACCOUNT),
])
def test_a_rate_below_the_line_is_never_paused_over_thousands(rate, lines):
    assert first_paused(rate, lines, up_to=5000) is None


def test_shuffled_lists_at_8_percent_are_paused_within_a_few_hundred():
    firsts = [first_paused(0.08, LANE, up_to=1000, seed=seed) for seed in range(40)]
    assert all(n is not None for n in firsts), firsts  # none goes out whole
    ordered = sorted(n for n in firsts if n is not None)
    assert ordered[len(ordered) // 2] <= 200 and ordered[-4] <= 500, ordered


@pytest.mark.parametrize("seed", range(20))
def test_a_shuffled_clean_list_at_2_percent_is_not_paused(seed):
    assert first_paused(0.02, LANE, up_to=3000, seed=seed) is None


@pytest.mark.parametrize("k,n,lo,hi", [
    # exact binomial bounds, one-sided 95% (rule of three: 0 of n -> about 3/n)
    (0, 100, 0.0, 0.0295),
    (1, 2, 0.0253, 0.9747),
    (10, 100, 0.0553, 0.1637),
])
def test_clopper_pearson_bounds(k, n, lo, hi):
    assert lower_bound(k, n, 0.95) == pytest.approx(lo, abs=2e-4)
    assert upper_bound(k, n, 0.95) == pytest.approx(hi, abs=2e-4)


def test_incomplete_beta_at_known_points():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248)
    assert betainc(50, 50, 0.5) == pytest.approx(0.5)


def test_one_bounce_in_two_sends_is_not_enough_evidence():
    assert verdict(Counts(judged=2, bounces=1), LANE) == ""
    assert verdict(Counts(judged=10, bounces=5), LANE).startswith("reputation:")


def test_complaints_count_against_judged_sends_that_did_not_bounce():
    c = Counts(judged=1000, bounces=100, complaints=9)
    assert c.complaint_base == 900 and c.complaint_rate == pytest.approx(0.01)
    reason = verdict(Counts(judged=2000, complaints=10), LANE, scope="bulk")
    assert "lane bulk complaint rate" in reason
    assert verdict(Counts(judged=2000, complaints=1), LANE) == ""


@pytest.mark.parametrize("counts,left", [
    (Counts(), 100),                                   # nothing known yet
    (Counts(judged=10, unknown=60), 40),               # thin evidence: 40 more
    (Counts(judged=10, unknown=150), 0),               # at the cap: wait for outcomes
    (Counts(judged=20, bounces=1, unknown=30), 70),
    (Counts(judged=60, unknown=500), None),            # 0 bounces in 60: proven clean
    (Counts(judged=400, bounces=8, unknown=999), None),  # 2%: proven below 5%
    (Counts(judged=400, bounces=16, unknown=20), 80),  # 4%: not proven, keeps the cap
])
def test_a_lane_runs_at_most_k_sends_ahead_until_proven_clean(counts, left):
    assert allowance(counts, LANE, ahead=100) == left


def test_no_cap_when_k_is_zero():
    assert allowance(Counts(unknown=10**6), LANE, ahead=0) is None


def test_tally_counts_outcomes_like_ses():
    rows = [
        ("bulk", "bounced", False, 8),
        ("bulk", "delivered", False, 80),
        ("bulk", "soft-bounced", False, 5),     # transient: judged, not a bounce
        ("bulk", "ses-suppressed", False, 30),  # SES did not try: not counted at all
        ("bulk", "failed", True, 3),
        ("bulk", "sent", False, 40),            # no outcome yet: unknown, not clean
        ("bulk", "sent", True, 7),              # settled without outcome: clean
        ("bulk", "complained", False, 2),
        ("", "bounced", True, 1),               # rows from before lanes: the default
        ("gone", "delivered", False, 4),        # a lane no longer configured
    ]
    out = tally(rows, lanes=("transactional", "bulk"), default="transactional")
    assert out["bulk"] == Counts(judged=8 + 80 + 5 + 7 + 2, bounces=8, complaints=2, unknown=40)
    assert out["transactional"] == Counts(judged=5, bounces=1)


@pytest.mark.parametrize("env,key,says", [
    ({"RELAY_FEEDBACK__MIN_SAMPLE": "200"}, "feedback.min_sample", "feedback.confidence"),
    ({"RELAY_FEEDBACK__CONFIDENCE": "0.3"}, "feedback.confidence", "0.5"),
    ({"RELAY_FEEDBACK__RESUME_CONFIDENCE": "1"}, "feedback.resume_confidence", "below 1"),
    ({"RELAY_FEEDBACK__ACCOUNT_MAX_BOUNCE_RATE": "2"}, "feedback.account_max_bounce_rate",
     "fraction"),
    ({"RELAY_FEEDBACK__MAX_UNJUDGED_SENDS": "-1"}, "feedback.max_unjudged_sends", "0"),
    ({"RELAY_FEEDBACK__BOUNCE_SETTLE": "0s"}, "feedback.bounce_settle", "above 0"),
    ({"RELAY_SANDBOX__EVENT_DELAY": "-1"}, "sandbox.event_delay", ""),
])
def test_guard_keys_are_checked_and_the_old_one_names_the_new(env, key, says, tmp_path):
    from relay import config as config_mod
    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env=env)
    assert key in str(err.value) and says in str(err.value)
    toml = tmp_path / "relay.toml"
    toml.write_text("[feedback]\nmin_sample = 200\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(toml, env={})
    assert "feedback.min_sample" in str(err.value) and "feedback.confidence" in str(err.value)
