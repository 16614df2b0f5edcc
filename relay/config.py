"""Configuration: one TOML file, overridden key by key by RELAY_<SECTION>__<KEY>.

Every section is a frozen dataclass whose field types drive parsing (relay.config_values),
so a TOML value and an environment string go through the same checks. Any bad value
raises ConfigError naming the key (`smtp.port`) and the reason, before anything starts.
Called by the CLI.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from relay.config_feedback import FeedbackConfig as FeedbackConfig
from relay.config_guard import RETIRED
from relay.config_lanes import LanesConfig
from relay.config_values import SANDBOX as SANDBOX
from relay.config_values import coerce
from relay.config_values import parse_duration as parse_duration
from relay.config_values import parse_size as parse_size
from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"
DEFAULT_CONFIG = Path("conf/relay.toml")


def _duration(**kw: Any) -> Any:
    return field(metadata={"duration": True}, **kw)


def _size(**kw: Any) -> Any:
    return field(metadata={"size": True}, **kw)


def _path(**kw: Any) -> Any:
    """A file or directory: relative in a config file means relative to that file's folder."""
    return field(metadata={"path": True}, **kw)


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = ""
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size: int = _size(default=10 * 1024 * 1024)
    max_recipients: int = 1000
    timeout: float = _duration(default=300.0)
    # Ingress hardening (TLS, AUTH, access, limits); checked in _check_hardening.
    tls_cert: str = _path(default="")
    tls_key: str = _path(default="")
    require_tls: bool = False
    implicit_tls: bool = False
    tls_port: int = 465
    auth_file: str = _path(default="")
    allow_plain_auth_from: tuple[str, ...] = ()
    auth_failure_delay: float = _duration(default=1.0)
    auth_max_failures: int = 10
    auth_lockout: float = _duration(default=900.0)
    allowed_sender_domains: tuple[str, ...] = ()
    max_connections: int = 200
    max_connections_per_client: int = 50
    max_errors: int = 20
    connection_rate_limit: int = 600
    error_delay: float = _duration(default=1.0)
    error_delay_after: int = 10
    max_junk_commands: int = 20
    data_timeout: float = _duration(default=600.0)
    reject_suppressed: bool = False
    #: 0 for "auto" (one per usable core): relay.config_cores.workers() gives the number
    workers: int = field(default=0, metadata={"auto": True})
    #: with one worker per core of the affinity mask, worker i runs on the i-th core only
    pin_workers: bool = True

    def check(self) -> None:
        _port("smtp.port", self.port)
        _check_hardening(self)
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError("smtp.allowed_networks", f"not a network: {net!r}") from None
        if not 1024 <= self.max_message_size <= 40 * 1024 * 1024:
            raise ConfigError(
                "smtp.max_message_size", "must be between 1 KB and 40 MB (the SES limit)"
            )
        if self.max_recipients < 1:
            raise ConfigError("smtp.max_recipients", "must be at least 1")


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = _path(default="spool")
    min_free_bytes: int = _size(default=64 * 1024 * 1024)
    fsync: bool = True

    def check(self) -> None:
        if not self.dir:
            raise ConfigError("spool.dir", "must not be empty")


@dataclass(frozen=True)
class SesConfig:
    region: str = "us-east-1"
    endpoint_url: str = ""
    configuration_set: str = ""
    connect_timeout: float = _duration(default=5.0)
    read_timeout: float = _duration(default=30.0)

    def check(self) -> None:
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", self.region):
            raise ConfigError("ses.region", f"not an AWS region name: {self.region!r}")
        url = self.endpoint_url
        if url and url != SANDBOX and not re.match(r"https?://[^/]+", url):
            raise ConfigError(
                "ses.endpoint_url", f"must be an http(s) URL or {SANDBOX!r}, got {url!r}"
            )


@dataclass(frozen=True)
class DeliveryConfig:
    max_rate: float = 0.0
    max_concurrency: int = 50
    min_backoff: float = _duration(default=300.0)
    max_backoff: float = _duration(default=4000.0)
    max_lifetime: float = _duration(default=5 * 86400.0)
    throttle_retry: float = _duration(default=1.0)
    scan_interval: float = _duration(default=1.0)
    account_refresh: float = _duration(default=300.0)
    pause_probe_interval: float = _duration(default=30.0)
    shutdown_timeout: float = _duration(default=30.0)
    ready_queue: int = 1000
    dsn_from: str = ""
    rate_guard: float = _duration(default=0.015)

    def check(self) -> None:
        if self.max_rate < 0:
            raise ConfigError("delivery.max_rate", "must be 0 (the account's rate) or more")
        if not 1 <= self.max_concurrency <= 1000:
            raise ConfigError("delivery.max_concurrency", "must be between 1 and 1000")
        if self.min_backoff <= 0 or self.max_backoff < self.min_backoff:
            raise ConfigError(
                "delivery.max_backoff", "must be at least delivery.min_backoff, both above 0"
            )
        if self.max_lifetime <= 0:
            raise ConfigError("delivery.max_lifetime", "must be above 0")
        if not 0 <= self.rate_guard <= 0.5:
            raise ConfigError("delivery.rate_guard", "must be between 0 and 500ms")
        if self.ready_queue < 1:
            raise ConfigError("delivery.ready_queue", "must be at least 1")
        if self.dsn_from and not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", self.dsn_from):
            raise ConfigError("delivery.dsn_from", f"not an email address: {self.dsn_from!r}")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    retention: float = _duration(default=90 * 86400.0)
    #: SQLite: how long a write waits for another writer's lock before it fails (and is
    #: retried: the message log keeps its rows until the database takes them)
    lock_timeout: float = _duration(default=30.0)
    #: on PostgreSQL, share the account's rate with every relay on the same database
    shared_rate: bool = True

    def check(self) -> None:
        if self.url and not re.match(r"(sqlite|postgresql)(\+\w+)?://", self.url):
            raise ConfigError("database.url",
                              f"must be a sqlite:// or postgresql:// URL, got {self.url!r}")
        if self.retention <= 0:
            raise ConfigError("database.retention", "must be above 0")
        if self.lock_timeout <= 0:
            raise ConfigError("database.lock_timeout", "must be above 0")


@dataclass(frozen=True)
class AdminConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8025
    #: the console's pages at / (relay.ops.console)
    console: bool = True
    #: "credentials": the console's login checks smtp.auth_file's users; "" none
    console_login: str = ""
    #: a token that logs in to the console (Authorization: Bearer, or the login form)
    console_token: str = ""
    #: more names the console answers to (Host header), beside localhost, IPs, admin.host
    allowed_hosts: tuple[str, ...] = ()

    def check(self) -> None:
        _port("admin.port", self.port)
        if any(not n or "/" in n for n in self.allowed_hosts):
            raise ConfigError("admin.allowed_hosts", "host names only, no scheme or path")
        if self.console_login not in ("", "credentials"):
            raise ConfigError("admin.console_login",
                              f'must be "credentials" or empty, got {self.console_login!r}')
        if self.console_token and len(self.console_token) < 16:
            raise ConfigError("admin.console_token", "must be at least 16 characters")


DKIM_DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)


@dataclass(frozen=True)
class DkimConfig:
    enabled: bool = False
    domain: str = ""
    selector: str = ""
    key_file: str = _path(default="")
    headers: tuple[str, ...] = DKIM_DEFAULT_HEADERS

    def check(self) -> None:
        if not self.enabled:
            return
        for key in ("domain", "selector", "key_file"):
            if not getattr(self, key):
                raise ConfigError(f"dkim.{key}", "must be set when dkim.enabled = true")
        if not Path(self.key_file).is_file():
            raise ConfigError("dkim.key_file", f"not a readable file: {self.key_file}")
        names = [h.lower() for h in self.headers]
        if "from" not in names:
            raise ConfigError("dkim.headers", "must include From (RFC 6376 5.4)")
        bad = [h for h in names if h.startswith("x-ses-")]
        if bad:
            raise ConfigError("dkim.headers", f"SES strips X-SES-* headers; remove {bad[0]}")


@dataclass(frozen=True)
class SandboxConfig:
    """The embedded SES-compatible endpoint used when ses.endpoint_url = "sandbox"."""

    dir: str = _path(default="")
    host: str = "127.0.0.1"
    port: int = 0
    max_send_rate: float = 14.0
    max_24hour_send: float = 50000.0
    latency: float = _duration(default=0.0)
    #: faults the sandbox answers to its first SendEmail calls, in order (throttle, 5xx,
    #: unavailable, paused, suspended, rejected, mailfrom, noconfigset, badrequest, slow,
    #: timeout, ok): a failure mode seen without writing code
    faults: tuple[str, ...] = ()
    #: seconds before the simulator's feedback can be read (SES's lag), more for complaints
    event_delay: float = _duration(default=0.0)
    complaint_delay: float = _duration(default=0.0)

    def check(self) -> None:
        _port("sandbox.port", self.port)
        if self.event_delay < 0 or self.complaint_delay < 0:
            raise ConfigError("sandbox.event_delay" if self.event_delay < 0
                              else "sandbox.complaint_delay", "must be 0 or more")
        if self.max_send_rate <= 0:
            raise ConfigError("sandbox.max_send_rate", "must be above 0")


@dataclass(frozen=True)
class SendmailConfig:
    """`relay sendmail`, the injector for programs that pipe mail to /usr/sbin/sendmail."""

    #: the domain a bare local name (`root`, `www-data`) gets, as cron and daemons address
    #: mail; "" means this host's fully qualified name
    local_domain: str = ""

    def check(self) -> None:
        domain = self.local_domain
        if domain and (domain.startswith("@") or "." not in domain.strip(".")):
            raise ConfigError("sendmail.local_domain",
                              f"must be a domain such as example.com, got {self.local_domain!r}")


@dataclass(frozen=True)
class Config:
    smtp: SmtpConfig = SmtpConfig()
    spool: SpoolConfig = SpoolConfig()
    ses: SesConfig = SesConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    database: DatabaseConfig = DatabaseConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    admin: AdminConfig = AdminConfig()
    dkim: DkimConfig = DkimConfig()
    sandbox: SandboxConfig = SandboxConfig()
    sendmail: SendmailConfig = SendmailConfig()
    lanes: LanesConfig = LanesConfig()
    source: str = "built-in defaults"

    @property
    def spool_path(self) -> Path:
        return Path(self.spool.dir)

    @property
    def sandbox_dir(self) -> Path:
        return Path(self.sandbox.dir) if self.sandbox.dir else self.spool_path / "sandbox-mail"


SECTIONS: dict[str, type] = {
    name: typ for name, typ in get_type_hints(Config).items() if name != "source"
}


def _check_hardening(c: SmtpConfig) -> None:
    _port("smtp.tls_port", c.tls_port)
    if bool(c.tls_cert) != bool(c.tls_key):
        raise ConfigError("smtp.tls_key" if c.tls_cert else "smtp.tls_cert",
                          "smtp.tls_cert and smtp.tls_key go together")
    for key in ("tls_cert", "tls_key", "auth_file"):
        path = getattr(c, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"smtp.{key}", f"not a readable file: {path}")
    if (c.require_tls or c.implicit_tls) and not c.tls_cert:
        raise ConfigError("smtp.tls_cert", "needed by smtp.require_tls / smtp.implicit_tls")
    for net in c.allow_plain_auth_from:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError("smtp.allow_plain_auth_from", f"not a network: {net!r}") from None
    for dom in c.allowed_sender_domains:
        if not re.fullmatch(r"[A-Za-z0-9.-]+\.[A-Za-z0-9-]+", dom.lstrip(".")):
            raise ConfigError("smtp.allowed_sender_domains", f"not a domain: {dom!r}")
    for key, least in (("auth_max_failures", 1), ("max_connections", 1),
                       ("max_connections_per_client", 1), ("max_errors", 1),
                       ("connection_rate_limit", 0), ("error_delay", 0),
                       ("error_delay_after", 0), ("max_junk_commands", 0)):
        if getattr(c, key) < least:
            raise ConfigError(f"smtp.{key}", f"must be at least {least}")
    if c.timeout <= 0 or c.data_timeout <= 0:
        raise ConfigError("smtp.timeout" if c.timeout <= 0 else "smtp.data_timeout",
                          "must be above 0")


def _port(key: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a port number 0-65535, got {value}")


def _build_section(name: str, cls: type, values: Mapping[str, Any],
                   env: Mapping[str, str], base: Path | None = None) -> Any:
    """One section from the file's values, then the environment's. A relative path from
    the file is taken relative to the file's folder (`base`), so that a command run from
    anywhere finds the same spool; one from the environment, relative to the current one."""
    if cls is LanesConfig:  # tables of lanes and rules (relay.config_lanes)
        return LanesConfig.from_table(values, env)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if f"{name}.{key}" in RETIRED:  # a key that is gone names what replaced it
            raise ConfigError(f"{name}.{key}", RETIRED[f"{name}.{key}"])
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key in [{name}]")
        kwargs[key] = coerce(f"{name}.{key}", fields[key], hints[key], value, from_env=False)
        if base is not None and fields[key].metadata.get("path") and kwargs[key]:
            # an absolute value stays as it is
            kwargs[key] = os.path.normpath(base / kwargs[key])
    prefix = f"{ENV_PREFIX}{name.upper()}__"
    for var, value in env.items():
        if not var.startswith(prefix):
            continue
        key = var[len(prefix):].lower()
        if f"{name}.{key}" in RETIRED:
            raise ConfigError(f"{name}.{key}", f"{RETIRED[f'{name}.{key}']} (from {var})")
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key (from environment variable {var})")
        kwargs[key] = coerce(f"{name}.{key}", fields[key], hints[key], value, from_env=True)
    section = cls(**kwargs)
    section.check()
    return section


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("config", f"{path} is a directory: give -c a TOML file") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def load(path: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration.

    path None means $RELAY_CONFIG, else conf/relay.toml if present, else the defaults.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get("RELAY_CONFIG") or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    data: dict[str, Any] = {}
    source = "built-in defaults"
    base: Path | None = None
    if path is not None:
        data = _read_toml(path)
        source = str(path)
        base = Path(path).resolve().parent
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(name, f"unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(data[name], dict):
            raise ConfigError(name, "must be a [section] table")
    for var in env:
        if var.startswith(ENV_PREFIX) and "__" in var:
            section = var[len(ENV_PREFIX):].split("__", 1)[0].lower()
            if section not in SECTIONS:
                raise ConfigError(section, f"unknown section (from environment variable {var})")
    sections = {
        name: _build_section(name, cls, data.get(name, {}), env, base)
        for name, cls in SECTIONS.items()
    }
    admin, smtp = sections["admin"], sections["smtp"]
    if admin.console_login == "credentials" and not smtp.auth_file:
        raise ConfigError("admin.console_login",
                          '"credentials" logs in with smtp.auth_file\'s users: set smtp.auth_file')
    return Config(source=source, **sections)
