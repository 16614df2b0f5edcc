"""[feedback]: the SQS ingester's and SNS endpoint's keys, with the guard's (GuardKeys).

Split from relay.config, which re-exports FeedbackConfig; checks name the key at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relay.config_guard import GuardKeys
from relay.config_values import SANDBOX
from relay.errors import ConfigError


def _duration(**kw: Any) -> Any:
    return field(metadata={"duration": True}, **kw)


@dataclass(frozen=True)
class FeedbackConfig(GuardKeys):
    """[feedback]: the SQS queue and SNS endpoint, and the reputation guard's keys."""

    sqs_queue_url: str = ""
    sqs_endpoint_url: str = ""
    wait_time: float = _duration(default=20.0)
    max_messages: int = 10
    soft_bounce_limit: int = 3
    topic_arns: tuple[str, ...] = ()
    sns_endpoint: bool = False
    receivers: int = 8
    raw_delivery: bool = False
    max_event_age: float = _duration(default=14 * 86400.0)

    def check(self) -> None:
        url = self.sqs_endpoint_url
        if url and url != SANDBOX and not re.match(r"https?://[^/]+", url):
            raise ConfigError("feedback.sqs_endpoint_url", f"must be an http(s) URL, got {url!r}")
        if not 0 <= self.wait_time <= 20:
            raise ConfigError("feedback.wait_time", "must be between 0 and 20 seconds (SQS limit)")
        if not 1 <= self.max_messages <= 10:
            raise ConfigError("feedback.max_messages", "must be between 1 and 10 (SQS limit)")
        if self.soft_bounce_limit < 1:
            raise ConfigError("feedback.soft_bounce_limit", "must be at least 1")
        for arn in self.topic_arns:
            if not re.fullmatch(r"arn:aws(-[a-z]+)*:sns:[a-z0-9-]+:\d{12}:[\w-]+", arn):
                raise ConfigError("feedback.topic_arns", f"not an SNS topic ARN: {arn!r}")
        if self.sns_endpoint and not self.topic_arns:
            raise ConfigError("feedback.topic_arns",
                              "must list the accepted topics when feedback.sns_endpoint is on")
        self.check_guard()
        self._check_ingester()

    def _check_ingester(self) -> None:
        if not 1 <= self.receivers <= 32:
            raise ConfigError("feedback.receivers", "must be between 1 and 32")
        if self.max_event_age <= 0:
            raise ConfigError("feedback.max_event_age", "must be above 0")
        if self.sqs_queue_url and self.sqs_endpoint_url != SANDBOX and not self.raw_delivery \
                and not self.topic_arns:
            raise ConfigError("feedback.topic_arns", "must list the SNS topics that feed "
                              "feedback.sqs_queue_url (their envelopes' signatures and topics "
                              "are checked), or set feedback.raw_delivery = true when the "
                              "subscription uses raw message delivery")
