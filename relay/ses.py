"""The SES adapter: the only module that talks to SES for sending.

One long-lived aioboto3 `sesv2` client (keep-alive pool, SDK retries off: the relay owns
retries) sends raw MIME with SendEmail and reads the account with GetAccount. Every
botocore or connection error is translated here into the relay's own DeliveryError
classes (relay.errors.classify). Built by relay.service; implements the Sender port.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

import aioboto3
import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig

from relay.config import SesConfig
from relay.delivery import Account
from relay.errors import ConfigurationError, DeliveryError, TransientError, classify
from relay.ratelimit import DEPARTURE

#: Header carrying the limiter's departure time to SES-compatible test endpoints (the
#: sandbox); never sent to AWS itself.
DEPARTURE_HEADER = "X-Relay-Departed"


def _stamp_departure(request: Any, **kwargs: Any) -> None:
    departed = DEPARTURE.get(None)
    if departed is not None:
        request.headers[DEPARTURE_HEADER] = f"{departed:.6f}"


class SesClient:
    """Implements relay.delivery.Sender and AccountSource over SESv2."""

    def __init__(
        self,
        cfg: SesConfig,
        *,
        endpoint_url: str | None = None,
        max_connections: int = 50,
        static_credentials: tuple[str, str] | None = None,
        stamp_departures: bool = False,
    ) -> None:
        self.cfg = cfg
        self.endpoint_url = endpoint_url if endpoint_url is not None else (cfg.endpoint_url or None)
        self.max_connections = max_connections
        self.static_credentials = static_credentials
        self.stamp_departures = stamp_departures
        self._cm: Any = None
        self._client: Any = None

    async def __aenter__(self) -> SesClient:
        kwargs: dict[str, Any] = {}
        if self.static_credentials:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self.static_credentials
        session = aioboto3.Session(region_name=self.cfg.region, **kwargs)
        config = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self.max_connections,
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.read_timeout,
            tcp_keepalive=True,
        )
        self._cm = session.client("sesv2", endpoint_url=self.endpoint_url, config=config)
        self._client = await self._cm.__aenter__()
        if self.stamp_departures:
            self._client.meta.events.register("before-send.sesv2.SendEmail", _stamp_departure)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)
            self._cm = self._client = None

    async def send_raw(
        self, *, sender: str, recipients: Sequence[str], raw: bytes
    ) -> str:
        params: dict[str, Any] = {
            "Destination": {"ToAddresses": list(recipients)},
            "Content": {"Raw": {"Data": raw}},
        }
        if sender:
            params["FromEmailAddress"] = sender
        if self.cfg.configuration_set:
            params["ConfigurationSetName"] = self.cfg.configuration_set
        resp = await self._call("send_email", params)
        return str(resp["MessageId"])

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
        try:
            return await getattr(self._client, op)(**params)  # type: ignore[no-any-return]
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "Unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            raise classify(code, status)(code, str(err.get("Message", ""))) from exc
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as exc:
            raise ConfigurationError("NoCredentials", str(exc)) from exc
        except (
            botocore.exceptions.BotoCoreError,
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ConnectionError,
            OSError,
        ) as exc:
            raise TransientError(type(exc).__name__, str(exc)) from exc
        except DeliveryError:
            raise
