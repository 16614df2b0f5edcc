"""DKIM: the relay signs with dkimpy; the message as SES receives it verifies with dkimpy's
verifier against the test public key (a dnsfunc stands in for DNS)."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.config import DkimConfig
from relay.errors import ConfigError
from relay.ingress.dkim import DkimSigner
from tests.conftest import wait_for

MSG = (b"From: App <app@example.com>\r\nTo: to@example.net\r\nSubject: signed\r\n"
       b"X-SES-CONFIGURATION-SET: marketing\r\nBcc: hidden@example.org\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
       b"Hello,\r\n.dot line and caf\xc3\xa9\r\n\r\n")


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.pem"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return path, record


def dnsfunc_for(record: bytes):
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"s1._domainkey.example.com." else None
    return dnsfunc


def test_signed_message_verifies_after_the_relay(start_relay, sandbox, key):
    path, record = key
    relay = start_relay(sandbox.url, dkim={"enabled": True, "domain": "example.com",
                                           "selector": "s1", "key_file": str(path)})
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("app@example.com")
        s.rcpt("to@example.net")
        assert s.data(MSG)[0] == 250
    raw = wait_for(lambda: sandbox.state.accepted(), 20)[0].raw
    assert raw.startswith(b"DKIM-Signature: ")
    assert dkim.verify(raw, dnsfunc=dnsfunc_for(record))
    sig = dkim.DKIM(raw)
    sig.verify(dnsfunc=dnsfunc_for(record))
    signed = [h.lower() for h in sig.include_headers]
    assert b"from" in signed and b"subject" in signed and b"date" in signed
    assert not any(h.startswith(b"x-ses-") for h in signed)
    assert b"hidden@example.org" not in raw  # Bcc removed before signing
    # the checks above can fail: a changed body or a wrong key does not verify
    assert not dkim.verify(raw.replace(b"Hello", b"Jello"), dnsfunc=dnsfunc_for(record))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    wrong = b"v=DKIM1; k=rsa; p=" + base64.b64encode(other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert not dkim.verify(raw, dnsfunc=dnsfunc_for(wrong))


def test_signature_survives_ses_stripping_x_ses_headers(key):
    path, record = key
    signer = DkimSigner(DkimConfig(enabled=True, domain="example.com", selector="s1",
                                   key_file=str(path)))
    signed = signer.sign(MSG)
    stripped = signed.replace(b"X-SES-CONFIGURATION-SET: marketing\r\n", b"")
    assert stripped != signed
    assert dkim.verify(stripped, dnsfunc=dnsfunc_for(record))
    # the rest of the message is untouched: the signature is only prepended
    assert signed.endswith(MSG)


def test_bad_key_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="dkim.key_file"):
        DkimSigner(DkimConfig(enabled=True, domain="example.com", selector="s1",
                              key_file=str(bad)))
