"""The SES adapter's lean SendEmail path, checked against botocore and real servers.

Signatures are compared with botocore's own SigV4Auth (real objects, same request and
timestamp); a verifying endpoint on loopback re-signs what arrived on the wire with
botocore; errors from the sandbox's scripted faults must come out of the lean path exactly
as they come out of the aioboto3 client.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import socket
import time
from typing import Any

import aiobotocore.session
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import create_parser
from botocore.session import get_session
from multidict import CIMultiDict

from relay.config import SesConfig
from relay.delivery.ratelimit import DEPARTURE
from relay.errors import ConfigurationError, DeliveryError, QuotaExceededError, TransientError
from relay.sandbox.server import FAULTS, SandboxState, SandboxThread
from relay.ses.client import SesClient, send_email_body
from relay.ses.errors import error_of
from relay.ses.signer import Signer

RAW = b"From: a@example.com\r\nSubject: t\r\n\r\n.dot line\r\n\xe9 8-bit\r\n"


# -- the signer against botocore's SigV4Auth ----------------------------------------


def botocore_signed(url: str, body: bytes, creds: Credentials, region: str) -> AWSRequest:
    """A request as botocore signs it (its own clock; the timestamp is read back)."""
    req = AWSRequest(method="POST", url=url, data=body,
                     headers={"Content-Type": "application/json"})
    SigV4Auth(creds, "ses", region).add_auth(req)
    return req


@pytest.mark.parametrize("url,host", [
    ("https://email.us-east-1.amazonaws.com/v2/email/outbound-emails",
     "email.us-east-1.amazonaws.com"),
    ("http://127.0.0.1:4566/v2/email/outbound-emails", "127.0.0.1:4566"),
    ("https://email.eu-west-1.amazonaws.com:443/v2/email/outbound-emails",
     "email.eu-west-1.amazonaws.com"),
])
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE//session+token=="])
def test_signature_equals_botocore_sigv4auth(url, host, token):
    region = url.split(".")[1] if "amazonaws" in url else "us-east-1"
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    signer = Signer(region, "ses")
    for n in range(3):  # the cached key must sign later requests just as well
        body = send_email_body(sender="a@example.com", recipients=[f"r{n}@example.net"], raw=RAW)
        req = botocore_signed(url, body, creds, region)
        date = req.headers["X-Amz-Date"]
        signed = {"content-type": "application/json", "host": host, "x-amz-date": date}
        if token:
            signed["x-amz-security-token"] = token
            assert req.headers["X-Amz-Security-Token"] == token
        ours = signer.authorization(method="POST", path="/v2/email/outbound-emails",
                                    headers=signed, payload_hash=hashlib.sha256(body).hexdigest(),
                                    access_key=creds.access_key, secret_key=creds.secret_key,
                                    date=date)
        assert ours == req.headers["Authorization"]
    assert signer.derived == 1


def test_header_values_are_trimmed_as_botocore_trims_them():
    creds = Credentials("AKID", "secret", None)
    url = "https://email.us-east-1.amazonaws.com/v2/email/outbound-emails"
    req = AWSRequest(method="POST", url=url, data=b"{}",
                     headers={"Content-Type": "application/json", "X-Extra": "  a   b \t c "})
    SigV4Auth(creds, "ses", "us-east-1").add_auth(req)
    date = req.headers["X-Amz-Date"]
    ours = Signer("us-east-1", "ses").authorization(
        method="POST", path="/v2/email/outbound-emails",
        headers={"content-type": "application/json", "host": "email.us-east-1.amazonaws.com",
                 "x-amz-date": date, "x-extra": "  a   b \t c "},
        payload_hash=hashlib.sha256(b"{}").hexdigest(), access_key="AKID", secret_key="secret",
        date=date)
    assert ours == req.headers["Authorization"]


def test_signing_key_is_derived_once_per_secret_and_day():
    signer = Signer("us-east-1", "ses")
    first = signer.key("secret", "20260101")
    assert signer.key("secret", "20260101") is first and signer.derived == 1
    assert signer.key("secret", "20260102") != first and signer.derived == 2
    assert signer.key("rotated", "20260102") != first and signer.derived == 3
    assert Signer("eu-west-1", "ses").key("secret", "20260101") != first


# -- the request on the wire, verified by botocore ----------------------------------


class VerifyingEndpoint:
    """SendEmail on loopback that re-signs each request with botocore and answers 403
    SignatureDoesNotMatch (as SES does) unless the Authorization header matches."""

    def __init__(self, secrets: dict[str, str], region: str = "us-east-1") -> None:
        self.secrets = secrets
        self.region = region
        self.received: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        access_key = auth.split("Credential=", 1)[-1].split("/", 1)[0]
        token = request.headers.get("X-Amz-Security-Token")
        # what botocore would have signed for this body at this request's timestamp
        req = AWSRequest(method="POST", url=self.url + "/v2/email/outbound-emails", data=body,
                         headers={"Content-Type": "application/json",
                                  "X-Amz-Date": request.headers.get("X-Amz-Date", "")})
        if token:
            req.headers["X-Amz-Security-Token"] = token
        req.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        sigv4 = SigV4Auth(Credentials(access_key, self.secrets.get(access_key, "?"), token),
                          "ses", self.region)
        canonical = sigv4.canonical_request(req)
        signature = sigv4.signature(sigv4.string_to_sign(req, canonical), req)
        expected = (f"AWS4-HMAC-SHA256 Credential={sigv4.scope(req)}, "
                    f"SignedHeaders={sigv4.signed_headers(sigv4.headers_to_sign(req))}, "
                    f"Signature={signature}")
        ok = auth == expected
        self.received.append({"ok": ok, "access_key": access_key, "token": token,
                              "body": json.loads(body), "headers": dict(request.headers)})
        if not ok:
            return web.json_response({"message": "signature mismatch"}, status=403,
                                     headers={"x-amzn-ErrorType": "SignatureDoesNotMatch:"})
        return web.json_response({"MessageId": f"m-{len(self.received)}"})


async def test_wire_request_is_signed_as_botocore_signs_it_with_a_session_token():
    endpoint = VerifyingEndpoint({"AKIDTEMP": "temporary/secret"})
    url = await endpoint.start()
    session = aiobotocore.session.get_session()
    session.set_credentials("AKIDTEMP", "temporary/secret", "session-token/with+chars=")
    try:
        async with SesClient(SesConfig(configuration_set="tracked"), endpoint_url=url,
                             botocore_session=session) as ses:
            ids = [await ses.send_raw(sender="a@example.com",
                                      recipients=["b@example.net", "c@example.org"], raw=RAW)
                   for _ in range(2)]
    finally:
        await endpoint.stop()
    assert ids == ["m-1", "m-2"]
    got = endpoint.received[0]
    assert got["ok"] and got["token"] == "session-token/with+chars="
    assert got["body"] == {
        "FromEmailAddress": "a@example.com",
        "Destination": {"ToAddresses": ["b@example.net", "c@example.org"]},
        "Content": {"Raw": {"Data": base64.b64encode(RAW).decode()}},
        "ConfigurationSetName": "tracked",
    }
    assert "X-Relay-Departed" not in got["headers"]


class RotatingProvider:
    """A credential provider whose credentials expire soon, so each use refreshes them."""

    METHOD = "test-rotating"
    CANONICAL_NAME = "test-rotating"

    def __init__(self) -> None:
        self.issued = 0

    def secrets(self) -> dict[str, str]:
        return {f"AKIDROT{n}": f"secret-{n}" for n in range(1, 20)}

    async def fetch(self) -> dict[str, str]:
        self.issued += 1
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=12)
        return {"access_key": f"AKIDROT{self.issued}", "secret_key": f"secret-{self.issued}",
                "token": f"token-{self.issued}", "expiry_time": expiry.isoformat()}

    async def load(self) -> AioRefreshableCredentials:
        return AioRefreshableCredentials.create_from_metadata(
            await self.fetch(), refresh_using=self.fetch, method=self.METHOD)


async def test_refreshable_credentials_are_refreshed_and_each_call_signed_with_the_current_ones():
    provider = RotatingProvider()
    endpoint = VerifyingEndpoint(provider.secrets())
    url = await endpoint.start()
    session = aiobotocore.session.get_session()
    session.get_component("credential_provider").insert_before("env", provider)
    try:
        async with SesClient(SesConfig(), endpoint_url=url, botocore_session=session) as ses:
            for _ in range(3):
                await ses.send_raw(sender="a@example.com", recipients=["b@example.net"], raw=RAW)
    finally:
        await endpoint.stop()
    # inside the 15-minute advisory window botocore refreshes on every use
    keys = [r["access_key"] for r in endpoint.received]
    assert all(r["ok"] for r in endpoint.received), endpoint.received
    assert len(set(keys)) == 3
    assert [r["token"] for r in endpoint.received] == [k.replace("AKIDROT", "token-") for k in keys]


async def test_a_wrong_signature_is_refused_by_the_verifying_endpoint():
    """The verifier itself can fail: a wrong secret gives SignatureDoesNotMatch, held."""
    endpoint = VerifyingEndpoint({"AKIDTEMP": "the real secret"})
    url = await endpoint.start()
    try:
        async with SesClient(SesConfig(), endpoint_url=url,
                             static_credentials=("AKIDTEMP", "a wrong secret")) as ses:
            with pytest.raises(ConfigurationError) as err:
                await ses.send_raw(sender="a@example.com", recipients=["b@example.net"], raw=RAW)
    finally:
        await endpoint.stop()
    assert err.value.code == "SignatureDoesNotMatch"
    assert not endpoint.received[0]["ok"]


# -- the sandbox: bytes, destinations, departure stamps, error classes --------------


@pytest.fixture
def sb():
    with SandboxThread(SandboxState(max_send_rate=1000, max_24hour_send=-1)) as thread:
        yield thread


def params(raw: bytes = RAW) -> dict[str, Any]:
    return {"FromEmailAddress": "a@example.com", "Destination": {"ToAddresses": ["b@example.net"]},
            "Content": {"Raw": {"Data": raw}}}


async def test_lean_path_delivers_the_same_bytes_and_destinations(sb):
    big = RAW + bytes(range(256)) * 4000  # every byte value, about 1 MB
    async with SesClient(SesConfig(configuration_set="cs"), endpoint_url=sb.url,
                         static_credentials=("a", "b")) as ses:
        mid = await ses.send_raw(sender="s@example.com",
                                 recipients=["x@example.net", "y@example.org"], raw=big)
    call = sb.state.accepted()[0]
    assert call.message_id == mid and call.raw == big
    assert call.recipients == ["x@example.net", "y@example.org"]
    assert call.sender == "s@example.com" and call.configuration_set == "cs"


async def test_departure_stamp_goes_to_custom_endpoints_only(sb):
    departed = time.time() - 1.5
    token = DEPARTURE.set(departed)
    try:
        for stamp in (True, False):
            async with SesClient(SesConfig(), endpoint_url=sb.url,
                                 static_credentials=("a", "b"), stamp_departures=stamp) as ses:
                await ses.send_raw(sender="a@example.com", recipients=["b@example.net"], raw=RAW)
    finally:
        DEPARTURE.reset(token)
    stamped, plain = sb.state.accepted()
    # the sandbox counts a call at its departure stamp when there is one
    assert abs(stamped.at - departed) < 1e-5 and stamped.arrived > departed + 1
    assert plain.at == plain.arrived
    # AWS itself (no endpoint_url) never gets the header
    assert not SesClient(SesConfig(), stamp_departures=True).stamp_departures


async def _error(coro: Any) -> DeliveryError:
    try:
        await coro
    except DeliveryError as exc:
        return exc
    raise AssertionError("no error")


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_every_scripted_fault_maps_as_the_aioboto3_client_maps_it(sb, fault):
    async with SesClient(SesConfig(), endpoint_url=sb.url,
                         static_credentials=("a", "b")) as ses:
        sb.state.script(fault, fault)
        sdk = await _error(ses._call("send_email", params()))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                         raw=RAW))
    assert (type(lean), lean.code, lean.message) == (type(sdk), sdk.code, sdk.message)
    assert lean.code == FAULTS[fault][1]


async def test_quota_and_too_many_recipients_map_as_the_aioboto3_client_maps_them(sb):
    rcpts = [f"r{i}@example.net" for i in range(51)]
    async with SesClient(SesConfig(), endpoint_url=sb.url,
                         static_credentials=("a", "b")) as ses:
        sdk = await _error(ses._call("send_email",
                                     dict(params(), Destination={"ToAddresses": rcpts})))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=rcpts, raw=RAW))
        assert (type(lean), lean.code, lean.message) == (type(sdk), sdk.code, sdk.message)
        sb.state.max_24hour_send = 0
        sdk = await _error(ses._call("send_email", params()))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                         raw=RAW))
        assert (type(lean), lean.code, lean.message) == (type(sdk), sdk.code, sdk.message)
        assert lean.code == "ThrottlingException" and "quota" in lean.message.lower()
        assert type(lean) is QuotaExceededError


async def test_read_timeout_and_refused_connection_are_transient_as_before(sb):
    cfg = SesConfig(read_timeout=0.3)
    sb.state.slow_seconds = 1.0
    async with SesClient(cfg, endpoint_url=sb.url, static_credentials=("a", "b")) as ses:
        sb.state.script("slow", "slow")
        sdk = await _error(ses._call("send_email", params()))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                         raw=RAW))
    assert type(lean) is type(sdk) is TransientError and lean.code == sdk.code == "ReadTimeoutError"
    # nothing listens on a port just freed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with SesClient(SesConfig(), endpoint_url=closed, static_credentials=("a", "b")) as ses:
        sdk = await _error(ses._call("send_email", params()))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                         raw=RAW))
    assert type(lean) is type(sdk) is TransientError
    assert lean.code == sdk.code == "EndpointConnectionError"


async def test_no_credentials_holds_the_mail_as_before(sb, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with SesClient(SesConfig(), endpoint_url=sb.url) as ses:
        sdk = await _error(ses._call("send_email", params()))
        lean = await _error(ses.send_raw(sender="a@example.com", recipients=["b@example.net"],
                                         raw=RAW))
    assert (type(lean), lean.code, lean.message) == (type(sdk), sdk.code, sdk.message)
    assert type(lean) is ConfigurationError and lean.code == "NoCredentials"


# -- error parsing against botocore's rest-json parser ------------------------------


@pytest.mark.parametrize("status,headers,body", [
    (400, {"x-amzn-ErrorType": "MessageRejected:http://internal.amazon.com/"},
     b'{"message":"Email address is not verified."}'),
    (400, {}, b'{"__type":"com.amazon.ses#SendingPausedException","message":"paused"}'),
    (400, {}, b'{"code":"BadRequestException","Message":"bad"}'),
    (429, {}, b'{"__type":"TooManyRequestsException:extra"}'),
    (404, {"X-Amzn-ErrorType": "NotFoundException"}, b'{"__type":"Other","message":"m"}'),
    (500, {}, b""),
    (502, {}, b"<html><body>Bad Gateway</body></html>"),
    (503, {}, b"not json at all"),
    (400, {}, b"{}"),
    (403, {}, b'{"Message":"The security token included in the request is invalid."}'),
])
def test_error_of_reads_codes_as_botocore_does(status, headers, body):
    model = get_session().get_service_model("sesv2").operation_model("SendEmail")
    parsed = create_parser("rest-json").parse(
        {"status_code": status, "headers": {k.lower(): v for k, v in headers.items()},
         "body": body}, model.output_shape)
    expected = (parsed["Error"]["Code"], parsed["Error"]["Message"])
    assert error_of(status, CIMultiDict(headers), body) == expected


def test_body_is_the_botocore_document():
    body = send_email_body(sender="Ünïcode <a@example.com>", recipients=["b@example.net"],
                           raw=RAW, configuration_set="cs")
    assert json.loads(body) == {
        "FromEmailAddress": "Ünïcode <a@example.com>",
        "Destination": {"ToAddresses": ["b@example.net"]},
        "Content": {"Raw": {"Data": base64.b64encode(RAW).decode()}},
        "ConfigurationSetName": "cs",
    }
    assert "FromEmailAddress" not in json.loads(
        send_email_body(sender="", recipients=["b@x.example"], raw=b"x"))
