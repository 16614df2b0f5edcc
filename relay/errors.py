"""The relay's own exceptions, and the table that sorts SES answers into them.

    RelayError
    ├── ConfigError            bad configuration; names the key
    ├── SpoolError             the spool could not take or change a message
    │   └── SpoolFullError     no room on disk (452 4.3.1)
    └── DeliveryError          one SendEmail call did not succeed
        ├── TransientError     retry later with backoff (5xx, timeouts, connection errors)
        │   └── ThrottledError retry soon and slow the rate (429, Throttling)
        ├── PermanentError     the recipients of the call fail with the reason
        ├── ConfigurationError hold the mail: the relay or account is misconfigured
        └── AccountPausedError pause the whole pool until GetAccount says sending is enabled

Only relay.ses.client raises DeliveryError subclasses, using classify(); this module imports no
AWS or SMTP library so that the core and its tests stay transport-free.
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


class PermanentError(DeliveryError):
    pass


class ConfigurationError(DeliveryError):
    pass


class AccountPausedError(DeliveryError):
    pass


#: SES error codes and the class each belongs to. Codes not listed fall back on the
#: HTTP status: 429 throttled, 5xx transient, other 4xx permanent.
ERROR_CLASSES: dict[str, type[DeliveryError]] = {
    "TooManyRequestsException": ThrottledError,
    "Throttling": ThrottledError,
    "ThrottlingException": ThrottledError,
    "LimitExceededException": ThrottledError,
    "ServiceUnavailable": TransientError,
    "InternalFailure": TransientError,
    "InternalServerError": TransientError,
    "RequestTimeout": TransientError,
    "MessageRejected": PermanentError,
    "BadRequestException": PermanentError,
    "InvalidParameterValue": PermanentError,
    "MailFromDomainNotVerifiedException": ConfigurationError,
    "NotFoundException": ConfigurationError,
    "AccessDeniedException": ConfigurationError,
    "UnrecognizedClientException": ConfigurationError,
    "InvalidClientTokenId": ConfigurationError,
    "SignatureDoesNotMatch": ConfigurationError,
    "SendingPausedException": AccountPausedError,
    "AccountSuspendedException": AccountPausedError,
}


def classify(code: str, status: int) -> type[DeliveryError]:
    """The error class for an SES error code and HTTP status."""
    if code in ERROR_CLASSES:
        return ERROR_CLASSES[code]
    if status == 429:
        return ThrottledError
    if status >= 500 or status == 0:
        return TransientError
    return PermanentError
