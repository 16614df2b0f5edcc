"""DKIM signing of accepted mail with dkimpy, before the spool write.

The signature covers the configured header list (dkim.headers, which leaves out the
X-SES-* headers SES strips) with relaxed/relaxed canonicalization and is prepended to
the message; the body and other headers are untouched. The key file is read once at
start. Built by relay.service, called by relay.ingress.server.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dkim as dkimpy

from relay.config import DkimConfig
from relay.errors import ConfigError

log = logging.getLogger("relay.dkim")


class DkimSigner:
    def __init__(self, config: DkimConfig) -> None:
        self.domain = config.domain.encode()
        self.selector = config.selector.encode()
        self.headers = [h.lower().encode() for h in config.headers]
        try:
            self.key = Path(config.key_file).read_bytes()
        except OSError as exc:
            raise ConfigError("dkim.key_file", f"cannot read: {exc}") from None
        try:  # fail at start, not on the first message
            dkimpy.sign(b"From: a@" + self.domain + b"\r\n\r\nx\r\n", self.selector,
                        self.domain, self.key, include_headers=[b"from"])
        except dkimpy.DKIMException as exc:
            raise ConfigError("dkim.key_file", f"not a usable private key: {exc}") from None

    def sign(self, data: bytes) -> bytes:
        """The message with its DKIM-Signature field first."""
        linesep = b"\r\n" if b"\r\n" in data[:4096] or b"\n" not in data else b"\n"
        field: bytes = dkimpy.sign(data, self.selector, self.domain, self.key,
                                   canonicalize=(b"relaxed", b"relaxed"),
                                   include_headers=self.headers, linesep=linesep)
        if linesep == b"\n":
            field = field.replace(b"\r\n", b"\n")
        return field + data
