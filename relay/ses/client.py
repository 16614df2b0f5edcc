"""The SES adapter: the only module that talks to SES for sending.

SendEmail (once per message) takes a lean path: the SESv2 REST request built directly (raw
MIME base64-encoded once), signed by relay.ses.signer with credentials from the botocore
chain, sent over relay.ses.http's keep-alive connections (through an HTTPS proxy, when
HTTPS_PROXY names one, over aiohttp's). GetAccount and ListSuppressedDestinations use an
aioboto3 client (SDK retries off: the relay owns retries). Both paths run inside
relay.ses.errors.map_ses_errors, so every failure leaves as a relay.errors.DeliveryError.
Built by relay.service; implements the Sender and AccountSource ports.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import aioboto3
import aiobotocore.session
import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from botocore.httpsession import create_urllib3_context, get_cert_path
from botocore.utils import get_environ_proxies, normalize_url_path
from yarl import URL

from relay import __version__
from relay.config import SesConfig
from relay.delivery.ports import Account
from relay.delivery.ratelimit import DEPARTURE
from relay.ses.errors import ErrorResponse, map_ses_errors
from relay.ses.http import HttpPool
from relay.ses.signer import Signer, amz_date
from relay.spool.record import SesOptions

#: Header carrying the limiter's departure time to SES-compatible test endpoints (the
#: sandbox); never sent to AWS itself.
DEPARTURE_HEADER = "X-Relay-Departed"
#: SESv2 SendEmail (botocore's sesv2 model: POST, rest-json, signing name "ses")
SEND_EMAIL_PATH = "/v2/email/outbound-emails"
SIGNING_NAME = "ses"
USER_AGENT = f"relay/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"
#: A request body above this goes to aiohttp as a stream, written in chunks with the loop
#: free between them; as one bytes object aiohttp writes it in one piece and warns.
LARGE_BODY = 2**20


def send_email_body(*, sender: str, recipients: Sequence[str], raw: bytes,
                    configuration_set: str = "", options: SesOptions | None = None) -> bytes:
    """The SendEmail JSON document, with the raw MIME base64-encoded exactly once.

    The message's options (its X-SES-* headers and its lane's defaults) become
    ConfigurationSetName (over ses.configuration_set), EmailTags, TenantName and
    ListManagementOptions. base64 needs no JSON escaping, so its bytes go into the
    document as they are.
    """
    opts = options or SesOptions()
    head: dict[str, Any] = {"Destination": {"ToAddresses": list(recipients)}}
    if sender:
        head["FromEmailAddress"] = sender
    if opts.configuration_set or configuration_set:
        head["ConfigurationSetName"] = opts.configuration_set or configuration_set
    if opts.tags:
        head["EmailTags"] = [{"Name": n, "Value": v} for n, v in opts.tags]
    if opts.tenant:
        head["TenantName"] = opts.tenant
    if opts.contact_list:
        head["ListManagementOptions"] = {"ContactListName": opts.contact_list}
        if opts.topic:
            head["ListManagementOptions"]["TopicName"] = opts.topic
    return b"".join((json.dumps(head, separators=(",", ":"))[:-1].encode(),
                     b',"Content":{"Raw":{"Data":"', base64.b64encode(raw), b'"}}}'))


class SesClient:
    """Implements relay.delivery.ports.Sender and AccountSource over SESv2."""

    def __init__(
        self,
        cfg: SesConfig,
        *,
        endpoint_url: str | None = None,
        max_connections: int = 50,
        static_credentials: tuple[str, str] | None = None,
        stamp_departures: bool = False,
        botocore_session: aiobotocore.session.AioSession | None = None,
    ) -> None:
        self.cfg = cfg
        self.endpoint_url = endpoint_url if endpoint_url is not None else (cfg.endpoint_url or None)
        self.max_connections = max_connections
        self.static_credentials = static_credentials
        # the departure stamp is for SES-compatible test endpoints only, never for AWS
        self.stamp_departures = stamp_departures and self.endpoint_url is not None
        self.botocore_session = botocore_session
        self.signer = Signer(cfg.region, SIGNING_NAME)
        self._cm: Any = None
        self._client: Any = None
        self._credentials: Any = None
        self._http: aiohttp.ClientSession | None = None  # through a proxy only
        self._pool: HttpPool | None = None
        self._url = URL()
        self._host = self._path = self._target = ""
        self._proxy: str | None = None

    async def __aenter__(self) -> SesClient:
        kwargs: dict[str, Any] = {}
        if self.static_credentials:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self.static_credentials
        botocore_session = self.botocore_session or aiobotocore.session.get_session()
        session = aioboto3.Session(region_name=self.cfg.region,
                                   botocore_session=botocore_session, **kwargs)
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self.max_connections,
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.read_timeout,
            tcp_keepalive=True,
        )
        self._cm = session.client("sesv2", endpoint_url=self.endpoint_url, config=config)
        self._client = await self._cm.__aenter__()
        # the session's credentials object, the one the client signs with (None: none found)
        self._credentials = await botocore_session.get_credentials()
        self._open_http(self._client.meta.endpoint_url,
                        botocore_session.get_config_variable("ca_bundle"))
        return self

    def _open_http(self, endpoint: str, ca_bundle: str | None) -> None:
        """The SendEmail connection pool, on the endpoint the SDK client resolved."""
        url = endpoint.rstrip("/") + SEND_EMAIL_PATH
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
            host = f"{host}:{parts.port}"
        self._host, self._url = host, URL(url, encoded=True)
        self._path = quote(normalize_url_path(parts.path), safe="/~")
        self._target = parts.path or "/"
        ssl: Any = False
        if parts.scheme == "https":
            # as botocore: the session's ca_bundle, else REQUESTS_CA_BUNDLE, else its bundle
            verify: Any = ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or True
            ssl = create_urllib3_context()
            ssl.load_verify_locations(get_cert_path(verify))
        # HTTPS_PROXY / NO_PROXY as botocore reads them, once (aiohttp's trust_env would
        # look them and ~/.netrc up again in a thread on every request)
        self._proxy = get_environ_proxies(url).get(parts.scheme)
        if self._proxy is None:
            self._pool = HttpPool(
                host=parts.hostname or "", port=parts.port or (443 if ssl else 80),
                ssl=ssl or None, limit=self.max_connections,
                connect_timeout=self.cfg.connect_timeout, read_timeout=self.cfg.read_timeout)
            return
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ssl=ssl),
            timeout=aiohttp.ClientTimeout(sock_connect=self.cfg.connect_timeout,
                                          sock_read=self.cfg.read_timeout),
            skip_auto_headers=("Content-Type",), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    @property
    def has_credentials(self) -> bool:
        """False when the AWS credential chain found nothing: every call would fail."""
        return self._credentials is not None

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)
            self._cm = self._client = None

    # -- SendEmail: the lean path ---------------------------------------------------

    async def send_raw(
        self, *, sender: str, recipients: Sequence[str], raw: bytes,
        options: SesOptions | None = None,
    ) -> str:
        if self._pool is None and self._http is None:
            raise RuntimeError("SesClient used outside 'async with'")
        body = send_email_body(sender=sender, recipients=recipients, raw=raw,
                               configuration_set=self.cfg.configuration_set,
                               options=options)
        with map_ses_errors(endpoint=str(self._url), proxy=self._proxy):
            headers = await self._signed_headers(body)
            if self._pool is not None:
                resp = await self._pool.post(self._target, headers, body)
                if resp.status >= 300:
                    raise ErrorResponse(resp.status, resp.headers, resp.body)
                return str(json.loads(resp.body)["MessageId"])
            assert self._http is not None
            data: bytes | io.BytesIO = body if len(body) <= LARGE_BODY else io.BytesIO(body)
            async with self._http.post(self._url, data=data, headers=headers,
                                       proxy=self._proxy, allow_redirects=False) as answer:
                status, got = answer.status, await answer.read()
                if status >= 300:
                    raise ErrorResponse(status, answer.headers, got)
            return str(json.loads(got)["MessageId"])

    async def _signed_headers(self, body: bytes) -> dict[str, str]:
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        creds = await self._credentials.get_frozen_credentials()
        if not creds.access_key or not creds.secret_key:
            raise botocore.exceptions.NoCredentialsError()
        date = amz_date()
        signed = {"content-type": "application/json", "host": self._host, "x-amz-date": date}
        if creds.token:
            signed["x-amz-security-token"] = creds.token
        headers = {
            "Host": self._host,
            "Content-Type": "application/json",
            "X-Amz-Date": date,
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",
            "Authorization": self.signer.authorization(
                method="POST", path=self._path, headers=signed,
                payload_hash=hashlib.sha256(body).hexdigest(),
                access_key=creds.access_key, secret_key=creds.secret_key, date=date),
        }
        if creds.token:
            headers["X-Amz-Security-Token"] = creds.token
        if self.stamp_departures:
            departed = DEPARTURE.get(None)
            if departed is not None:
                headers[DEPARTURE_HEADER] = f"{departed:.6f}"
        return headers

    # -- the rare calls: the SDK client ---------------------------------------------

    async def get_account(self) -> Account:
        resp = await self._call("get_account", {})
        quota = resp.get("SendQuota", {})
        return Account(
            max_send_rate=float(quota.get("MaxSendRate", 1.0)),
            max_24hour_send=float(quota.get("Max24HourSend", 200.0)),
            sent_last_24hours=float(quota.get("SentLast24Hours", 0.0)),
            sending_enabled=bool(resp.get("SendingEnabled", True)),
            enforcement_status=str(resp.get("EnforcementStatus", "")),
            production_access=bool(resp.get("ProductionAccessEnabled", False)),
        )

    async def suppressed_destinations(self) -> AsyncIterator[tuple[str, str]]:
        """SES's account-level suppression list (ListSuppressedDestinations), every page."""
        params: dict[str, Any] = {"PageSize": 1000}
        while True:
            resp = await self._call("list_suppressed_destinations", params)
            for item in resp.get("SuppressedDestinationSummaries", []):
                yield str(item["EmailAddress"]), str(item.get("Reason", ""))
            token = resp.get("NextToken")
            if not token:
                return
            params = {"PageSize": 1000, "NextToken": token}

    async def _call(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        if self._client is None:
            raise RuntimeError("SesClient used outside 'async with'")
        with map_ses_errors():
            return await getattr(self._client, op)(**params)  # type: ignore[no-any-return]
