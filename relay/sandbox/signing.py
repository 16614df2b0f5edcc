"""The sandbox's SNS signing key: its envelopes verify like AWS's, with a self-signed cert.

One RSA key and self-signed certificate per process (made on first use), served by the
sandbox at CERT_PATH on its loopback URL. sign() adds SigningCertURL, SignatureVersion 2
and the Signature SNS computes (the string to sign of relay.feedback.sns). The relay
trusts this key only for the embedded sandbox (relay.service hands the key to the
verifier in-process); an SNS envelope from anywhere else must name an AWS certificate URL.
Used by relay.sandbox.server and the tests.
"""

from __future__ import annotations

import base64
import datetime
import functools
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from relay.feedback.sns import string_to_sign

#: where the sandbox serves its certificate (the shape of an SNS certificate path)
CERT_PATH = "/SimpleNotificationService-sandbox.pem"


@dataclass(frozen=True)
class SigningKey:
    key: rsa.RSAPrivateKey
    #: the self-signed certificate, PEM
    pem: bytes

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.key.public_key()

    def sign(self, msg: dict[str, Any], cert_url: str) -> dict[str, Any]:
        """msg with the SNS signature fields (SignatureVersion 2: SHA256)."""
        msg = dict(msg, SignatureVersion="2", SigningCertURL=cert_url)
        signature = self.key.sign(string_to_sign(msg), padding.PKCS1v15(), hashes.SHA256())
        msg["Signature"] = base64.b64encode(signature).decode()
        return msg


@functools.cache
def signing_key() -> SigningKey:
    """The process's sandbox signing key and its self-signed certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay sandbox SNS")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return SigningKey(key, cert.public_bytes(serialization.Encoding.PEM))
