"""TLS for the SMTP ingress: a server context with modern settings only.

TLS 1.2 or newer, forward-secret AEAD ciphers for TLS 1.2, no compression or
renegotiation; no client certificates asked for. Reads smtp.tls_cert / smtp.tls_key
once at start. Built by relay.ingress.server.Ingress for STARTTLS and the implicit-TLS listener.
"""

from __future__ import annotations

import ssl

from relay.config import SmtpConfig
from relay.errors import ConfigError


def server_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """None when no certificate is configured (then neither STARTTLS nor AUTH is offered)."""
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("smtp.tls_cert", f"cannot load certificate and key: {exc}") from None
    return ctx
