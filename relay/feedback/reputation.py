"""The reputation guard's arithmetic, as pure functions of counts: tested by tables.

A lane (or the account) is judged on its sends whose outcome had time to arrive: a send
counts once SES reported its delivery or bounce, or once feedback.bounce_settle passed
without either; unknown sends are not counted as clean. It is paused when the one-sided
Clopper-Pearson lower confidence bound of its rate is above the line (so the evidence
needed scales with how far the rate is above it), and may not run more than
feedback.max_unjudged_sends ahead of its known outcomes until the upper bound proves it
below the line. Used by relay.feedback.guard; tables in tests/unit/test_reputation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the scope name of the whole account (lane names are lowercase letters, digits, _ -)
ACCOUNT = "*"
REASON_PREFIX = "reputation:"


@dataclass(frozen=True)
class Counts:
    """One lane's (or the account's) sends over the window the guard judges."""

    #: sends counted in the bounce rate: a known outcome, or settled without one
    judged: int = 0
    #: permanent bounces (OnAccountSuppressionList and transient ones excluded)
    bounces: int = 0
    #: complaints
    complaints: int = 0
    #: sends SES accepted whose outcome is unknown and not yet settled
    unknown: int = 0

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.judged if self.judged else 0.0

    @property
    def complaint_base(self) -> int:
        """Complaints are counted against the judged sends that did not bounce: early on
        (complaints trail by hours) the rate is a lower bound of what it will be."""
        return max(self.judged - self.bounces, self.complaints)

    @property
    def complaint_rate(self) -> float:
        base = self.complaint_base
        return self.complaints / base if base else 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.judged + other.judged, self.bounces + other.bounces,
                      self.complaints + other.complaints, self.unknown + other.unknown)


@dataclass(frozen=True)
class Lines:
    """The rates a scope may not exceed, and how sure the guard must be."""

    bounce: float
    complaint: float
    #: one-sided confidence of the bounds (0.95: wrongly paused 1 time in 20 at the line)
    confidence: float = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-12
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 20000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
          + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def _solve(f: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = f (bisection: I is increasing in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(48):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < f:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def lower_bound(k: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson lower confidence bound of a rate: k events in n."""
    if k <= 0 or n <= 0:
        return 0.0
    return _solve(1.0 - confidence, k, n - k + 1)


def upper_bound(k: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson upper confidence bound of a rate: k events in n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return _solve(confidence, k + 1, n - k)


def verdict(c: Counts, lines: Lines, *, scope: str = ACCOUNT) -> str:
    """The pause reason, or "" while the rates are not proven above their lines."""
    where = "account" if scope == ACCOUNT else f"lane {scope}"
    if lower_bound(c.bounces, c.judged, lines.confidence) > lines.bounce:
        return (f"{REASON_PREFIX} {where} bounce rate {c.bounce_rate:.4f} above "
                f"{lines.bounce} ({c.bounces} bounces / {c.judged} judged sends)")
    if lower_bound(c.complaints, c.complaint_base, lines.confidence) > lines.complaint:
        return (f"{REASON_PREFIX} {where} complaint rate {c.complaint_rate:.4f} above "
                f"{lines.complaint} ({c.complaints} complaints / {c.complaint_base} "
                "judged sends)")
    return ""


def proven_clean(c: Counts, lines: Lines) -> bool:
    """The bounce rate is below the line with the lines' confidence (complaints trail by
    hours: they judge, but do not hold a lane back)."""
    return upper_bound(c.bounces, c.judged, lines.confidence) < lines.bounce


def allowance(c: Counts, lines: Lines, *, ahead: int) -> int | None:
    """How many more sends a lane may make before more outcomes are known: None (no
    limit) once it is proven clean, else what is left of `ahead` unknown sends."""
    if ahead <= 0 or proven_clean(c, lines):
        return None
    return max(0, ahead - c.unknown)
