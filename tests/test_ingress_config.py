"""Configuration of the ingress hardening keys: defaults, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay import config
from relay.errors import ConfigError
from tests.conftest import ROOT, write_config


def load(tmp_path: Path, sections: dict) -> config.Config:
    return config.load(write_config(tmp_path / "r.toml", sections), env={})


def test_defaults():
    c = config.load(env={})
    assert c.smtp.max_recipients == 1000 and c.smtp.max_message_size == 10 * 1024 * 1024
    assert not c.smtp.require_tls and c.smtp.allow_plain_auth_from == ()
    assert c.dkim.enabled is False and "from" in c.dkim.headers


@pytest.mark.parametrize("sections, key", [
    ({"smtp": {"tls_cert": "CERT"}}, "smtp.tls_key"),
    ({"smtp": {"require_tls": True}}, "smtp.tls_cert"),
    ({"smtp": {"implicit_tls": True}}, "smtp.tls_cert"),
    ({"smtp": {"tls_port": 70000}}, "smtp.tls_port"),
    ({"smtp": {"auth_file": "/nonexistent/users"}}, "smtp.auth_file"),
    ({"smtp": {"allow_plain_auth_from": ["loopback"]}}, "smtp.allow_plain_auth_from"),
    ({"smtp": {"allowed_sender_domains": ["not a domain"]}}, "smtp.allowed_sender_domains"),
    ({"smtp": {"max_connections": 0}}, "smtp.max_connections"),
    ({"smtp": {"max_connections_per_client": 0}}, "smtp.max_connections_per_client"),
    ({"smtp": {"max_errors": 0}}, "smtp.max_errors"),
    ({"smtp": {"auth_max_failures": 0}}, "smtp.auth_max_failures"),
    ({"smtp": {"data_timeout": "0s"}}, "smtp.data_timeout"),
    ({"smtp": {"max_message_size": "41MB"}}, "smtp.max_message_size"),
    ({"dkim": {"enabled": True, "selector": "s", "key_file": "KEY"}}, "dkim.domain"),
    ({"dkim": {"enabled": True, "domain": "example.com", "key_file": "KEY"}}, "dkim.selector"),
    ({"dkim": {"enabled": True, "domain": "example.com", "selector": "s",
               "key_file": "/nonexistent"}}, "dkim.key_file"),
    ({"dkim": {"enabled": True, "domain": "example.com", "selector": "s", "key_file": "KEY",
               "headers": ["from", "x-ses-configuration-set"]}}, "dkim.headers"),
    ({"dkim": {"enabled": True, "domain": "example.com", "selector": "s", "key_file": "KEY",
               "headers": ["subject"]}}, "dkim.headers"),
])
def test_bad_values_name_the_key(tmp_path, sections, key):
    (tmp_path / "f").write_text("x")
    for section in sections.values():
        for k, v in section.items():
            if v in ("CERT", "KEY"):
                section[k] = str(tmp_path / "f")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, sections)
    assert key in str(exc.value)


def test_example_config_documents_every_key():
    text = (ROOT / "conf" / "relay.example.toml").read_text()
    for section in ("smtp", "dkim"):
        body = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        documented = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", body, re.M))
        fields = {f for f in config.SECTIONS[section].__dataclass_fields__}
        assert fields <= documented, fields - documented
