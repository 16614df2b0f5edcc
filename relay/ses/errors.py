"""SES answers and transport failures, translated into the relay's exceptions in one place.

`map_ses_errors()` wraps every call to SES (the lean SendEmail path and the SDK client): a
botocore ClientError, an error answer read off the wire (ErrorResponse), a credential
problem, a timeout or a connection failure leaves it as a relay.errors.DeliveryError. The
code table and the daily-quota message are SES knowledge, so they live here and nowhere
else: the core catches exception classes and never reads an error's text. Used by
relay.ses.client.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import botocore.exceptions
from botocore.httpsession import mask_proxy_url

from relay.errors import (
    AccountPausedError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    QuotaExceededError,
    ThrottledError,
    TransientError,
)

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


def classify(code: str, status: int, message: str = "") -> type[DeliveryError]:
    """The error class for an SES error code, HTTP status and message.

    SES reports the 24-hour quota as a throttling error ("ThrottlingException: Daily
    message quota exceeded."): not too fast but too much, which waits for the rolling
    24 hours rather than slowing the rate.
    """
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        if status == 429:
            cls = ThrottledError
        elif status >= 500 or status == 0:
            cls = TransientError
        else:
            cls = PermanentError
    text = message.lower()
    if issubclass(cls, ThrottledError) and "daily" in text and "quota" in text:
        return QuotaExceededError
    return cls


def error_of(status: int, headers: Mapping[str, str], body: bytes) -> tuple[str, str]:
    """(code, message) of an SES error response, as botocore's rest-json parser reads it.

    `headers` must look names up case-insensitively (aiohttp's CIMultiDict does).
    """
    if status >= 500 and (not body.strip() or body.strip().startswith(b"<html>")):
        return str(status), http.client.responses.get(status, "")  # a proxy's page
    doc: Any
    try:
        doc = json.loads(body.decode("utf-8")) if body else {}
    except ValueError:
        doc = {"message": body.decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        doc = {}
    message = doc.get("message", doc.get("Message", ""))
    code: Any = doc.get("__type", str(status))
    if code is None:
        code = ""
    elif isinstance(code, str):
        code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    header = headers.get("x-amzn-ErrorType")
    if header is not None:
        code = header
    elif "code" in doc or "Code" in doc:
        code = doc.get("code", doc.get("Code", ""))
    if isinstance(code, str):
        code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    return str(code), str(message)


class ErrorResponse(Exception):
    """An error answer (HTTP status >= 300) read on the lean path, before mapping."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


def transport_error(exc: BaseException, url: str, proxy: str | None = None) -> TransientError:
    """A connection-level failure as the TransientError the aiobotocore client gave."""
    b = botocore.exceptions
    err: Exception
    if isinstance(exc, aiohttp.ClientSSLError):
        err = b.SSLError(endpoint_url=url, error=exc)
    elif isinstance(exc, (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError)):
        err = b.ProxyConnectionError(proxy_url=mask_proxy_url(proxy or ""), error=exc)
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        err = b.ConnectionClosedError(endpoint_url=url, error=exc)
    elif isinstance(exc, aiohttp.ServerTimeoutError) and str(exc).lower().startswith("connect"):
        err = b.ConnectTimeoutError(endpoint_url=url, error=exc)
    elif isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        err = b.ReadTimeoutError(endpoint_url=url, error=exc)
    elif isinstance(exc, (aiohttp.ClientConnectionError, socket.gaierror, OSError)):
        err = b.EndpointConnectionError(endpoint_url=url, error=exc)
    else:
        err = b.HTTPClientError(error=exc)
    return TransientError(type(err).__name__, str(err))


def ses_error(exc: Exception, *, endpoint: str | None = None,
              proxy: str | None = None) -> DeliveryError | None:
    """The DeliveryError an exception from an SES call stands for (None: not SES's).

    `endpoint` is the lean path's URL: there a raw aiohttp failure is named as botocore
    would have named it (so both paths report alike), and a 2xx that is not SES's answer
    (ValueError, KeyError, TypeError while reading it) is an InvalidResponse.
    """
    b = botocore.exceptions
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, ErrorResponse):
        code, message = error_of(exc.status, exc.headers, exc.body)
        return classify(code, exc.status, message)(code, message)
    if isinstance(exc, b.ClientError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "Unknown")), str(err.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        return classify(code, status, message)(code, message)
    if isinstance(exc, (b.NoCredentialsError, b.PartialCredentialsError)):
        return ConfigurationError("NoCredentials", str(exc))
    if isinstance(exc, b.BotoCoreError):  # e.g. a failed credential refresh
        return TransientError(type(exc).__name__, str(exc))
    if isinstance(exc, (aiohttp.ClientError, TimeoutError, OSError)):
        if endpoint is not None:
            return transport_error(exc, endpoint, proxy)
        return TransientError(type(exc).__name__, str(exc))
    if endpoint is not None and isinstance(exc, (ValueError, KeyError, TypeError)):
        return TransientError("InvalidResponse", f"{type(exc).__name__}: {exc}")
    return None


@contextmanager
def map_ses_errors(*, endpoint: str | None = None, proxy: str | None = None) -> Iterator[None]:
    """Run an SES call; whatever it raises that ses_error() knows leaves as that error."""
    try:
        yield
    except Exception as exc:
        mapped = ses_error(exc, endpoint=endpoint, proxy=proxy)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc
