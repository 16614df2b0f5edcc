"""The SNS HTTPS endpoint: signatures v1/v2 from a test CA's certificate, served by an
injected fetcher for the one allow-listed URL; every rejection is 403, fetches nothing
when the URL is wrong, and leaves the database unchanged."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid

import aiohttp
import pytest
from aiohttp import web

from relay.feedback.applier import FeedbackApplier
from relay.feedback.sns import SnsEndpoint, Verifier
from relay.store.db import Database
from tests.conftest import database_for, wait_for
from tests.feedback_helpers import CERT_URL, TOPIC, notification, signed, sns_message
from tests.feedback_helpers import pki as make_pki
from tests.feedback_helpers import snapshot as db_snapshot

TABLES = ("suppressions", "messages", "feedback_events", "bounce_counts")


@pytest.fixture(scope="module")
def pki():
    """A test CA and an SNS-like signing certificate it issued."""
    return make_pki()


def bounce_message(address: str = "x@example.net", **extra) -> dict:
    doc = notification("ses-notification-bounce-permanent-no-dsn.json", message_id="0100-sns",
                       destination=[address])
    return sns_message(doc, **extra)


@pytest.fixture
async def endpoint(tmp_path, pki):
    _, pem = pki
    fetched: list[str] = []
    confirmed: list[str] = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        assert url == CERT_URL, "only the allow-listed URL may ever be fetched"
        return pem

    async def confirm(url: str) -> bytes:
        confirmed.append(url)
        return b"<ConfirmSubscriptionResponse/>"

    db = await Database.open(database_for(tmp_path), tmp_path)
    sns = SnsEndpoint(applier=FeedbackApplier(db), confirm=confirm,
                      verifier=Verifier(topic_arns=[TOPIC], fetch=fetch))
    app = web.Application()
    app.router.add_post("/sns", sns.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    session = aiohttp.ClientSession()

    async def post(msg: dict | str) -> int:
        body = msg if isinstance(msg, str) else json.dumps(msg)
        async with session.post(f"http://127.0.0.1:{port}/sns", data=body) as resp:
            return resp.status

    async def snapshot() -> dict:
        return await db_snapshot(tmp_path, TABLES)

    yield {"post": post, "fetched": fetched, "confirmed": confirmed, "snapshot": snapshot}
    await session.close()
    await runner.cleanup()
    await db.close()


@pytest.mark.parametrize("version", ["1", "2"])
async def test_valid_signature_is_applied(endpoint, pki, version):
    key, _ = pki
    assert await endpoint["post"](signed(key, bounce_message(), version)) == 200
    rows = (await endpoint["snapshot"]())["suppressions"]
    assert [r[0] for r in rows] == ["x@example.net"]
    # cached: a second message fetches nothing more
    assert await endpoint["post"](signed(key, bounce_message("z@example.net"), version)) == 200
    assert endpoint["fetched"] == [CERT_URL]


async def test_changed_byte_and_wrong_version_are_rejected(endpoint, pki):
    key, _ = pki
    before = await endpoint["snapshot"]()
    good = signed(key, bounce_message())
    tampered = dict(good, Message=good["Message"].replace("x@example.net", "y@example.net"))
    assert await endpoint["post"](tampered) == 403
    assert await endpoint["post"](dict(good, SignatureVersion="2")) == 403  # signed as v1
    assert await endpoint["post"](dict(good, SignatureVersion="3")) == 403
    sig = bytearray(base64.b64decode(good["Signature"]))
    sig[10] ^= 1
    tampered = dict(good, Signature=base64.b64encode(bytes(sig)).decode())
    assert await endpoint["post"](tampered) == 403
    assert (await endpoint["snapshot"]()) == before


@pytest.mark.parametrize("url", [
    "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-0123456789abcdef.pem",
    "https://s3.amazonaws.com/sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem",
    "https://sns-us-east-1.s3.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem",
    "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem",
    "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem",
    "https://user@sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem",
    "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-0123456789abcdef.pem",
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem?x=1",
    "https://sns.us-east-1.amazonaws.com/evil/SimpleNotificationService-0123456789abcdef.pem",
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-XYZ.pem",
])
async def test_certificate_url_elsewhere_is_rejected_without_fetching(endpoint, pki, url):
    key, _ = pki
    before = await endpoint["snapshot"]()
    assert await endpoint["post"](signed(key, bounce_message(SigningCertURL=url))) == 403
    assert endpoint["fetched"] == []
    assert (await endpoint["snapshot"]()) == before


async def test_unknown_topic_rejected_and_confirmation_only_for_listed_topics(endpoint, pki):
    key, _ = pki
    other = "arn:aws:sns:us-east-1:123456789012:someone-else"
    assert await endpoint["post"](signed(key, bounce_message(TopicArn=other))) == 403
    assert endpoint["fetched"] == []
    confirmation = {
        "Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": "2336412f37",
        "TopicArn": TOPIC, "Message": "You have chosen to subscribe to the topic.",
        "SubscribeURL": f"https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37",
        "Timestamp": "2026-11-22T00:00:00.000Z", "SigningCertURL": CERT_URL,
    }
    assert await endpoint["post"](signed(key, dict(confirmation, TopicArn=other),)) == 403
    assert endpoint["confirmed"] == []
    assert await endpoint["post"](signed(key, confirmation, "2")) == 200
    assert endpoint["confirmed"] == [confirmation["SubscribeURL"]]
    assert await endpoint["post"]("not json") == 400


def test_relay_serves_sns_on_the_admin_listener(start_relay, sandbox):
    relay = start_relay(sandbox.url, feedback={"sns_endpoint": True, "topic_arns": [TOPIC]})
    # the documentation sample, with its certificate URL moved off SNS: refused unfetched
    msg = bounce_message(SigningCertURL=CERT_URL.replace(".com/", ".com.evil.example/"),
                         SignatureVersion="1", Signature="EXAMPLE")
    req = urllib.request.Request(f"http://127.0.0.1:{relay.admin_port}/sns",
                                 data=json.dumps(msg).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    err.value.close()  # the error carries the open response
    assert err.value.code == 403
    wait_for(lambda: relay.find("sns_rejected"), 10)


async def test_json_nested_too_deep_is_a_400_and_changes_nothing(endpoint, pki):
    key, _ = pki
    before = await endpoint["snapshot"]()
    assert await endpoint["post"]("[" * 100_000 + "]" * 100_000) == 400
    # nested inside the signed SES document: verified, then refused as unparseable
    deep = signed(key, bounce_message(Message="[" * 20_000 + "]" * 20_000))
    assert await endpoint["post"](deep) == 400
    assert (await endpoint["snapshot"]()) == before


async def test_the_sandbox_key_is_trusted_only_where_it_is_pinned():
    """The sandbox signs its envelopes with its own certificate on its loopback URL: the
    embedded sandbox's relay pins that key; any other verifier refuses the URL unfetched."""
    from relay.feedback.sns import Rejected
    from relay.sandbox.signing import CERT_PATH, signing_key
    from relay.sandbox.simulator import sandbox_topic, sns_envelope

    url = "http://127.0.0.1:8599" + CERT_PATH
    key = signing_key()
    msg = json.loads(sns_envelope({"notificationType": "Bounce"},
                                  sign=lambda m: key.sign(m, cert_url=url)))
    fetched: list[str] = []

    async def fetch(u: str) -> bytes:
        fetched.append(u)
        return key.pem

    await Verifier(topic_arns=[sandbox_topic()], pinned={url: key.public_key}).verify(msg)
    with pytest.raises(Rejected, match="plain https"):
        await Verifier(topic_arns=[sandbox_topic()], fetch=fetch).verify(msg)
    assert fetched == []
    forged = dict(msg, Message=msg["Message"].replace("Bounce", "Delivery"))
    with pytest.raises(Rejected, match="does not verify"):
        await Verifier(topic_arns=[sandbox_topic()], pinned={url: key.public_key}).verify(forged)
