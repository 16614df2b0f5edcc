"""AWS Signature Version 4 for the relay's own SendEmail requests.

Pure (hashlib and hmac only): relay.ses.client builds each request and asks a Signer for its
Authorization header. The signing key depends only on the secret key, the day, the region
and the service, so it is derived once per day (and per credential rotation) and cached,
not four HMACs per request. tests/test_ses.py checks every signature against botocore's
SigV4Auth for the same request and timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

ALGORITHM = "AWS4-HMAC-SHA256"
#: sha256 of an empty payload
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def amz_date(now: float | None = None) -> str:
    """The X-Amz-Date value (basic ISO 8601, UTC) for `now`, default the current time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def derive_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    """The SigV4 signing key: four chained HMACs over the day, region and service."""
    key = hmac.digest(f"AWS4{secret_key}".encode(), day.encode(), "sha256")
    for part in (region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


class Signer:
    """Signs requests for one region and service; caches the signing key."""

    def __init__(self, region: str, service: str) -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        #: signing keys derived so far: one per secret key and UTC day
        self.derived = 0

    def key(self, secret_key: str, day: str) -> bytes:
        """The signing key for (secret_key, day, this region, this service), cached."""
        found = self._keys.get((secret_key, day))
        if found is None:
            if len(self._keys) >= 4:
                self._keys.clear()  # old days and rotated secrets: never used again
            found = self._keys[secret_key, day] = derive_key(
                secret_key, day, self.region, self.service)
            self.derived += 1
        return found

    def authorization(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        payload_hash: str,
        access_key: str,
        secret_key: str,
        date: str,
        query: str = "",
    ) -> str:
        """The Authorization header value.

        `headers` are the headers to sign, names in lower case, including host and
        x-amz-date (and x-amz-security-token with temporary credentials); `path` is the
        canonical (URI-encoded) path; `date` the X-Amz-Date value.
        """
        names = sorted(headers)
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed = ";".join(names)
        canonical = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{payload_hash}"
        day = date[:8]
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = (f"{ALGORITHM}\n{date}\n{scope}\n"
                   f"{hashlib.sha256(canonical.encode()).hexdigest()}")
        signature = hmac.digest(self.key(secret_key, day), to_sign.encode(), "sha256").hex()
        return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, " \
               f"Signature={signature}"
