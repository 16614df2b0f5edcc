"""The relay's own exceptions.

    RelayError
    ├── ConfigError            bad configuration; names the key
    ├── SpoolError             the spool could not take or change a message
    │   └── SpoolFullError     no room on disk (452 4.3.1)
    └── DeliveryError          one SendEmail call did not succeed
        ├── TransientError     retry later with backoff (5xx, timeouts, connection errors)
        │   └── ThrottledError retry soon and slow the rate (429, Throttling)
        │       └── QuotaExceededError  the 24-hour quota is used up: wait, keep the rate
        ├── PermanentError     the recipients of the call fail with the reason
        ├── ConfigurationError hold the mail: the relay or account is misconfigured
        └── AccountPausedError pause the whole pool until GetAccount says sending is enabled

Only the SES edge raises DeliveryError subclasses (relay.ses.errors.map_ses_errors turns SES
answers and transport failures into them); the core catches classes and never reads an
error's text. This module imports no AWS or SMTP library, so the core stays transport-free.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class SpoolError(RelayError):
    """A spool write or state change failed; nothing was acknowledged."""


class SpoolFullError(SpoolError):
    """The spool's file system is out of space (or below spool.min_free_bytes)."""


class DeliveryError(RelayError):
    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class TransientError(DeliveryError):
    pass


class ThrottledError(TransientError):
    pass


class QuotaExceededError(ThrottledError):
    """The account's 24-hour quota is used up: not too fast but too much. The rate stays;
    the mail waits for the rolling 24 hours to free some of the quota."""


class PermanentError(DeliveryError):
    pass


class ConfigurationError(DeliveryError):
    pass


class AccountPausedError(DeliveryError):
    pass
