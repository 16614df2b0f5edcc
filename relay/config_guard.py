"""The reputation guard's keys of [feedback]: their checks, and the keys they replaced.

max_bounce_rate / max_complaint_rate: each lane's line (SES's review levels, 5% / 0.1%);
account_max_*: the whole account's (every lane pauses; below SES's 10% / 0.5% pause);
confidence: one-sided confidence that a rate is above its line before pausing;
resume_confidence: the same for what is sent after `relay resume` (judged on its own);
bounce_settle: a send with no Delivery or Bounce event after this long counts as clean;
max_unjudged_sends: sends a lane not yet proven clean may make ahead of its known
outcomes (0: no cap); guard_debounce: the least time between two checks. Pure;
relay.config.FeedbackConfig inherits GuardKeys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.errors import ConfigError

#: keys that are gone -> what replaced them (the error names the new key)
RETIRED = {
    "feedback.min_sample": "no longer used: the evidence needed now scales with the rate "
                           "(set feedback.confidence, and feedback.max_unjudged_sends)",
}


def _duration(default: float) -> Any:
    return field(default=default, metadata={"duration": True})


@dataclass(frozen=True)
class GuardKeys:
    """The reputation guard's keys of [feedback] (relay.config.FeedbackConfig has them)."""

    max_bounce_rate: float = 0.05
    max_complaint_rate: float = 0.001
    account_max_bounce_rate: float = 0.08
    account_max_complaint_rate: float = 0.004
    confidence: float = 0.95
    resume_confidence: float = 0.8
    bounce_settle: float = _duration(default=900.0)
    max_unjudged_sends: int = 100
    reputation_window: float = _duration(default=86400.0)
    guard_interval: float = _duration(default=30.0)
    guard_debounce: float = _duration(default=1.0)

    def check_guard(self) -> None:
        for key in ("max_bounce_rate", "max_complaint_rate", "account_max_bounce_rate",
                    "account_max_complaint_rate"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"feedback.{key}",
                                  "must be a fraction above 0 and at most 1")
        for key in ("confidence", "resume_confidence"):
            if not 0.5 <= getattr(self, key) < 1:
                raise ConfigError(f"feedback.{key}", "must be a fraction from 0.5 to below 1")
        if self.max_unjudged_sends < 0:
            raise ConfigError("feedback.max_unjudged_sends", "must be 0 (no cap) or more")
        for key in ("reputation_window", "guard_interval", "guard_debounce", "bounce_settle"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"feedback.{key}", "must be above 0")
