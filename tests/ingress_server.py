"""The real SMTP ingress (relay.ingress) on its own event loop in a thread, for ingress tests.

Built exactly as relay.service builds it (IngressHandler + Ingress over a real Spool in a
temporary directory), bound to 127.0.0.1 on an ephemeral port, stopped at teardown; plus
raw-socket helpers for what smtplib refuses to send, and a throwaway CA for TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.config import SmtpConfig
from relay.ingress.credentials import Credentials
from relay.ingress.server import Ingress, IngressHandler
from relay.spool.spool import Spool
from tests import spoolfile


class IngressThread:
    def __init__(self, spool_dir: Path, config: SmtpConfig, *,
                 ingress_kw: dict[str, Any] | None = None, **handler_kw: Any) -> None:
        self.spool = Spool(spool_dir, fsync=False, min_free_bytes=0)
        self.spool.recover()
        self.config = config
        self.handler_kw = handler_kw
        #: Ingress keyword arguments (observer)
        self.ingress_kw = ingress_kw or {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.tls_port = 0
        self.ingress: Ingress | None = None

    def start(self) -> IngressThread:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(timeout=30)
        return self

    async def _start(self) -> None:
        handler = IngressHandler(spool=self.spool, config=self.config, **self.handler_kw)
        self.ingress = Ingress(handler, self.config, **self.ingress_kw)
        _, self.port = await self.ingress.start()
        if self.ingress.tls_address:
            self.tls_port = self.ingress.tls_address[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    async def _stop(self) -> None:
        if self.ingress is not None:
            await self.ingress.close(grace=1.0)
        # a group commit answers its sessions from its thread before its task ends: let
        # such work finish (cancel what still waits after that) before the loop closes
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if rest:
            _, pending = await asyncio.wait(rest, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def messages(self) -> list[bytes]:
        d = self.spool.root / "active"
        return [spoolfile.mime(p) for p in sorted(d.iterdir())] if d.is_dir() else []

    def envelopes(self) -> list[str]:
        d = self.spool.root / "active"
        if not d.is_dir():
            return []
        return [json.dumps(spoolfile.record(p)) for p in sorted(d.iterdir())]


def make_ingress(tmp_path: Path, **overrides: Any) -> Callable[..., IngressThread]:
    """Used by the `ingress` fixtures: start(**SmtpConfig fields) -> a running server."""
    started: list[IngressThread] = []

    def start(handler_kw: dict[str, Any] | None = None, ingress_kw: dict[str, Any] | None = None,
              **fields: Any) -> IngressThread:
        config = replace(SmtpConfig(host="127.0.0.1", port=0), **{**overrides, **fields})
        config.check()
        server = IngressThread(tmp_path / f"spool{len(started)}", config, ingress_kw=ingress_kw,
                               **(handler_kw or {}))
        started.append(server)
        return server.start()

    start.started = started  # type: ignore[attr-defined]
    return start


class Raw:
    """A raw SMTP conversation: bytes out exactly as given, reply lines in."""

    def __init__(self, port: int, *, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source is not None else None)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """One whole reply (all lines of a multi-line one), b"" at EOF."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tls_ingress(tmp_path: Path, tls: dict[str, Any],
                **overrides: Any) -> Iterator[Callable[..., IngressThread]]:
    """For a fixture: starts ingresses with a `tls` fixture's certificate and AUTH users
    (yield from it), and stops every one started when the test ends."""
    start = make_ingress(tmp_path, tls_cert=tls["cert"], tls_key=tls["key"], **overrides)

    def started(**fields: Any) -> IngressThread:
        return start(handler_kw={"credentials": Credentials(tls["users"])}, **fields)

    yield started
    for server in start.started:
        server.stop()


def make_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("relay test CA"))
          .issuer_name(name("relay test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx
