"""Config values by type: what a TOML value and an environment string each become, and the
exact error an operator reads when one is wrong (the key, then what was expected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.errors import ConfigError


def load(tmp_path: Path, key: str, toml: str | None, env: str | None) -> Any:
    """Load a config with one value set, in TOML (a literal) or the environment (text)."""
    section, name = key.split(".")
    path = tmp_path / "relay.toml"
    path.write_text(f"[{section}]\n{name} = {toml}\n" if toml is not None else "")
    environ = {} if env is None else {f"RELAY_{section.upper()}__{name.upper()}": env}
    return getattr(getattr(config.load(path, env=environ), section), name)


@pytest.mark.parametrize(
    "key, toml, env, value",
    [
        ("admin.enabled", "false", None, False),
        ("admin.enabled", None, "yes", True),
        ("admin.enabled", None, "ON", True),
        ("admin.enabled", None, "1", True),
        ("admin.enabled", None, "off", False),
        ("admin.enabled", None, "False", False),
        ("admin.enabled", None, "0", False),
        ("delivery.max_concurrency", "7", None, 7),
        ("delivery.max_concurrency", None, " 7 ", 7),
        ("delivery.max_rate", "5", None, 5.0),
        ("delivery.max_rate", "2.5", None, 2.5),
        ("delivery.max_rate", None, "2.5", 2.5),
        ("ses.configuration_set", '"cs"', None, "cs"),
        ("ses.configuration_set", None, "cs", "cs"),
        ("smtp.allowed_sender_domains", '["a.example", "b.example"]', None,
         ("a.example", "b.example")),
        ("smtp.allowed_sender_domains", None, "a.example, b.example,,", ("a.example", "b.example")),
        ("smtp.allowed_sender_domains", "[]", None, ()),
        ("delivery.min_backoff", '"10m"', None, 600.0),
        ("delivery.min_backoff", None, "10m", 600.0),
        ("smtp.max_message_size", '"2MB"', None, 2 * 1024**2),
        ("smtp.max_message_size", None, "2MB", 2 * 1024**2),
    ],
)
def test_a_value_becomes_its_type(tmp_path, key, toml, env, value):
    got = load(tmp_path, key, toml, env)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize(
    "key, toml, env, message",
    [
        ("admin.enabled", "3", None, "admin.enabled: must be true or false, got 3"),
        ("admin.enabled", '"yes"', None, "admin.enabled: must be true or false, got 'yes'"),
        ("admin.enabled", None, "maybe", "admin.enabled: must be true or false, got 'maybe'"),
        ("delivery.max_concurrency", "5.0", None,
         "delivery.max_concurrency: must be an integer, got 5.0"),
        ("delivery.max_concurrency", "true", None,
         "delivery.max_concurrency: must be an integer, got True"),
        ("delivery.max_concurrency", '"5"', None,
         "delivery.max_concurrency: must be an integer, got '5'"),
        ("delivery.max_concurrency", None, "7.5",
         "delivery.max_concurrency: must be an integer, got '7.5'"),
        ("delivery.max_rate", "true", None, "delivery.max_rate: must be a number, got True"),
        ("delivery.max_rate", '"5"', None, "delivery.max_rate: must be a number, got '5'"),
        ("delivery.max_rate", None, "fast", "delivery.max_rate: must be a number, got 'fast'"),
        ("ses.configuration_set", "5", None, "ses.configuration_set: must be a string, got 5"),
        ("smtp.allowed_sender_domains", '"a.example"', None,
         "smtp.allowed_sender_domains: must be a list of strings, got 'a.example'"),
        ("smtp.allowed_sender_domains", "[1]", None,
         "smtp.allowed_sender_domains: must be a list of strings, got [1]"),
        ("delivery.min_backoff", "true", None,
         "delivery.min_backoff: must be a duration such as 30s, 5m or 5d, got True"),
        ("delivery.min_backoff", None, "soon",
         "delivery.min_backoff: must be a duration such as 30s, 5m or 5d, got 'soon'"),
        ("smtp.max_message_size", '"2 parsecs"', None,
         "smtp.max_message_size: must be a size such as 10MB or 512KB, got '2 parsecs'"),
        ("smtp.max_message_size", "false", None,
         "smtp.max_message_size: must be a size such as 10MB, got False"),
    ],
)
def test_a_wrong_value_names_the_key_and_what_was_expected(tmp_path, key, toml, env, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, key, toml, env)
    assert info.value.key == key
    assert str(info.value) == message


@pytest.mark.parametrize("feedback, error", [
    ('sqs_queue_url = "https://sqs.eu-west-1.amazonaws.com/123456789012/q"',
     "feedback.topic_arns: must list the SNS topics"),
    ("receivers = 0", "feedback.receivers: must be between 1 and 32"),
    ('max_event_age = "0s"', "feedback.max_event_age: must be above 0"),
])
def test_feedback_queue_errors_name_the_key(tmp_path, feedback, error):
    path = tmp_path / "relay.toml"
    path.write_text(f"[feedback]\n{feedback}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert str(err.value).startswith(error)


@pytest.mark.parametrize("extra", ["raw_delivery = true",
                                   'topic_arns = ["arn:aws:sns:eu-west-1:123456789012:t"]'])
def test_a_queue_is_read_with_its_topics_or_as_raw_delivery(tmp_path, extra):
    path = tmp_path / "relay.toml"
    path.write_text('[feedback]\nsqs_queue_url = "https://sqs.eu-west-1.amazonaws.com/1/q"\n'
                    f"{extra}\n")
    assert config.load(path, env={}).feedback.max_event_age == 14 * 86400
