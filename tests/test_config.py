"""Configuration: defaults, TOML, RELAY_<SECTION>__<KEY> overrides, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_documented_operator_surface():
    cfg = config.load(None, env={})
    assert (cfg.smtp.host, cfg.smtp.port) == ("127.0.0.1", 2525)
    assert cfg.spool.dir == "spool"
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 8025)
    assert cfg.delivery.max_lifetime == 5 * 86400
    assert cfg.smtp.allowed_networks == ("127.0.0.0/8", "::1/128")


def test_env_overrides_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[smtp]\nport = 2600\n[ses]\nregion = "eu-west-1"\n')
    cfg = config.load(path, env={"RELAY_SMTP__PORT": "2700", "RELAY_SES__ENDPOINT_URL": "http://127.0.0.1:9"})
    assert cfg.smtp.port == 2700
    assert cfg.ses.region == "eu-west-1"
    assert cfg.ses.endpoint_url == "http://127.0.0.1:9"


def test_relay_config_env_names_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[smtp]\nport = 2601\n")
    assert config.load(None, env={"RELAY_CONFIG": str(path)}).smtp.port == 2601


@pytest.mark.parametrize(
    "text, env, key",
    [
        ("[smtp]\nport = 70000\n", {}, "smtp.port"),
        ('[smtp]\nport = "x"\n', {}, "smtp.port"),
        ("", {"RELAY_SMTP__PORT": "abc"}, "smtp.port"),
        ("[smtp]\nprot = 25\n", {}, "smtp.prot"),
        ("[smpt]\nport = 25\n", {}, "smpt"),
        ("", {"RELAY_SMPT__PORT": "25"}, "smpt"),
        ('[smtp]\nallowed_networks = ["10.0.0.0/33"]\n', {}, "smtp.allowed_networks"),
        ('[smtp]\nmax_message_size = "100MB"\n', {}, "smtp.max_message_size"),
        ('[ses]\nregion = "nowhere"\n', {}, "ses.region"),
        ('[ses]\nendpoint_url = "ftp://x"\n', {}, "ses.endpoint_url"),
        ('[delivery]\nmax_lifetime = "five days"\n', {}, "delivery.max_lifetime"),
        ("[delivery]\nmax_rate = -1\n", {}, "delivery.max_rate"),
        ('[delivery]\nmin_backoff = "10m"\nmax_backoff = "1m"\n', {}, "delivery.max_backoff"),
        ("[admin]\nenabled = 3\n", {}, "admin.enabled"),
        ('[admin]\nconsole_login = "ldap"\n', {}, "admin.console_login"),
        ('[admin]\nconsole_login = "credentials"\n', {}, "admin.console_login"),
        ('[admin]\nconsole_token = "short"\n', {}, "admin.console_token"),
        ('[admin]\nallowed_hosts = ["https://relay.internal/"]\n', {}, "admin.allowed_hosts"),
        ("[admin]\nallowed_hosts = \"relay.internal\"\n", {}, "admin.allowed_hosts"),
        ("[smtp\n", {}, "config"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, env, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path, env=env)
    assert info.value.key == key
    assert str(info.value).startswith(key)


@pytest.mark.parametrize(
    "value, seconds",
    [(30, 30.0), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
     ("250ms", 0.25), (0.5, 0.5)],
)
def test_durations(value, seconds):
    assert config.parse_duration("k", value) == seconds


@pytest.mark.parametrize(
    "value, size", [(1024, 1024), ("10MB", 10 * 1024**2), ("512k", 512 * 1024)]
)
def test_sizes(value, size):
    assert config.parse_size("k", value) == size


@pytest.mark.parametrize("name", ["local.toml", "relay.example.toml"])
def test_shipped_configs_load(name):
    path = ROOT / "conf" / name
    if not path.exists():
        pytest.fail(f"conf/{name} is missing")
    config.load(path, env={})


def test_cli_reports_config_error(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.toml"
    path.write_text("[smtp]\nport = 99999\n")
    out = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "smtp.port" in out.stderr


def test_relative_paths_in_a_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    conf = tmp_path / "etc" / "relay.toml"
    conf.parent.mkdir()
    users = tmp_path / "users"  # an absolute path stays as it is
    users.write_text("")
    conf.write_text('[spool]\ndir = "../queue"\n[sandbox]\ndir = "mail"\n'
                    f'[smtp]\nauth_file = "{users}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the command runs from another directory
    cfg = config.load(conf, env={})
    assert cfg.spool.dir == str(tmp_path / "queue")
    assert cfg.sandbox.dir == str(tmp_path / "etc" / "mail")
    assert cfg.smtp.auth_file == str(users)
    # the same file named by a relative path gives the same answer
    monkeypatch.chdir(tmp_path)
    assert config.load("etc/relay.toml", env={}).spool.dir == str(tmp_path / "queue")
    # from the environment, relative to the current directory as before
    assert config.load(conf, env={"RELAY_SPOOL__DIR": "here"}).spool.dir == "here"
    # no file: the built-in default, relative to the current directory
    assert config.load(None, env={}).spool.dir == "spool"
