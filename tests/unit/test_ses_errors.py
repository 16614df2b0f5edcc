"""map_ses_errors: every SES answer and transport failure leaves as the relay's own class.

A table of what SES (or the network) says against the class, code and message the core
sees. SES reports the 24-hour quota as a throttling error whose message names the daily
quota ("ThrottlingException: Daily message quota exceeded."); only this edge reads that
text, and the core gets a QuotaExceededError.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import botocore.exceptions
import pytest
from multidict import CIMultiDict

from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    QuotaExceededError,
    ThrottledError,
    TransientError,
)
from relay.ses.errors import ErrorResponse, classify, map_ses_errors

LEAN = "http://127.0.0.1:9/v2/email/outbound-emails"


def client_error(code: str, status: int, message: str = "") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "SendEmail")


def mapped(exc: BaseException, **where: Any) -> BaseException:
    try:
        with map_ses_errors(**where):
            raise exc
    except BaseException as out:  # noqa: BLE001 - the table inspects whatever came out
        return out
    raise AssertionError("nothing raised")


@pytest.mark.parametrize("code,status,message,cls", [
    ("TooManyRequestsException", 429, "Maximum sending rate exceeded.", ThrottledError),
    ("ThrottlingException", 400, "Maximum sending rate exceeded.", ThrottledError),
    ("ThrottlingException", 400, "Daily message quota exceeded.", QuotaExceededError),
    ("Throttling", 400, "Daily message quota exceeded.", QuotaExceededError),
    ("LimitExceededException", 400, "", ThrottledError),
    ("InternalFailure", 500, "An internal error occurred.", TransientError),
    ("ServiceUnavailable", 503, "", TransientError),
    ("MessageRejected", 400, "Email address is not verified.", PermanentError),
    ("BadRequestException", 400, "", PermanentError),
    ("MailFromDomainNotVerifiedException", 400, "", ConfigurationError),
    ("NotFoundException", 404, "Configuration set does not exist.", ConfigurationError),
    ("SignatureDoesNotMatch", 403, "", ConfigurationError),
    ("SendingPausedException", 400, "Sending is paused for this account.", AccountPausedError),
    ("AccountSuspendedException", 400, "", AccountPausedError),
    # codes SES did not document: the HTTP status decides
    ("Unheard", 429, "", ThrottledError),
    ("Unheard", 429, "daily quota", QuotaExceededError),
    ("Unheard", 502, "", TransientError),
    ("Unheard", 0, "", TransientError),
    ("Unheard", 400, "quota, daily", PermanentError),  # not a throttle: the text is no matter
])
def test_sdk_client_errors_map_by_code_status_and_the_daily_quota(code, status, message, cls):
    err = mapped(client_error(code, status, message))
    assert type(err) is cls
    assert isinstance(err, DeliveryError) and (err.code, err.message) == (code, message)
    assert isinstance(err.__cause__, botocore.exceptions.ClientError)
    assert classify(code, status, message) is cls


@pytest.mark.parametrize("status,headers,body,cls,code", [
    (429, {}, b'{"__type":"TooManyRequestsException","message":"Maximum sending rate exceeded."}',
     ThrottledError, "TooManyRequestsException"),
    (400, {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/"},
     b'{"message":"Daily message quota exceeded."}', QuotaExceededError, "ThrottlingException"),
    (400, {}, b'{"__type":"com.amazon.ses#SendingPausedException","message":"paused"}',
     AccountPausedError, "SendingPausedException"),
    (400, {}, b'{"code":"MessageRejected","message":"no"}', PermanentError, "MessageRejected"),
    (403, {"x-amzn-ErrorType": "SignatureDoesNotMatch:"}, b'{"message":"mismatch"}',
     ConfigurationError, "SignatureDoesNotMatch"),
    (502, {}, b"<html><body>Bad Gateway</body></html>", TransientError, "502"),
    (503, {}, b"", TransientError, "503"),
])
def test_lean_path_error_answers_map_as_the_sdk_maps_them(status, headers, body, cls, code):
    err = mapped(ErrorResponse(status, CIMultiDict(headers), body), endpoint=LEAN)
    assert type(err) is cls and err.code == code


@pytest.mark.parametrize("exc,lean,cls,code", [
    (botocore.exceptions.NoCredentialsError(), False, ConfigurationError, "NoCredentials"),
    (botocore.exceptions.NoCredentialsError(), True, ConfigurationError, "NoCredentials"),
    (botocore.exceptions.PartialCredentialsError(provider="env", cred_var="secret"), True,
     ConfigurationError, "NoCredentials"),
    (botocore.exceptions.EndpointConnectionError(endpoint_url=LEAN), False,
     TransientError, "EndpointConnectionError"),
    (botocore.exceptions.ReadTimeoutError(endpoint_url=LEAN), False,
     TransientError, "ReadTimeoutError"),
    # the lean path names raw aiohttp failures as botocore names them for the SDK path
    (aiohttp.ServerDisconnectedError(), True, TransientError, "ConnectionClosedError"),
    (TimeoutError(), True, TransientError, "ReadTimeoutError"),
    (ConnectionRefusedError(111, "refused"), True, TransientError, "EndpointConnectionError"),
    (aiohttp.ServerDisconnectedError(), False, TransientError, "ServerDisconnectedError"),
    (TimeoutError(), False, TransientError, "TimeoutError"),
    (ConnectionResetError(104, "reset"), False, TransientError, "ConnectionResetError"),
    # a 2xx on the lean path that is not SES's answer
    (KeyError("MessageId"), True, TransientError, "InvalidResponse"),
    (ValueError("Expecting value"), True, TransientError, "InvalidResponse"),
])
def test_credentials_timeouts_and_connections_map_to_their_class(exc, lean, cls, code):
    err = mapped(exc, **({"endpoint": LEAN} if lean else {}))
    assert type(err) is cls and err.code == code
    assert err.__cause__ is exc


def test_what_is_not_an_ses_failure_passes_through_untouched():
    own = PermanentError("MessageRejected", "already mapped")
    assert mapped(own, endpoint=LEAN) is own
    bug = RuntimeError("a bug is not an SES answer")
    assert mapped(bug) is bug and mapped(bug, endpoint=LEAN) is bug
    # outside the lean path's answer reading, a ValueError is a bug too
    value = ValueError("x")
    assert mapped(value) is value
