"""What the relay says about a setup that cannot work, and at start: /readyz names missing
AWS credentials (mail accepted then would never leave), a refused client's log line names
the setting that admits it, and start-up logs only the relay's own lines."""

from __future__ import annotations

import smtplib

from tests.conftest import RelayProcess, readyz, relay_sections, wait_for

#: an environment in which the AWS SDK's credential chain finds nothing
NO_AWS: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None, "AWS_WEB_IDENTITY_TOKEN_FILE": None,
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None, "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/relay-test/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/relay-test/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def test_readyz_names_missing_aws_credentials(tmp_path, sandbox):
    relay = RelayProcess(tmp_path, relay_sections(tmp_path, sandbox.url), environ=NO_AWS)
    try:
        relay.start()
        code, text = readyz(relay.admin_port)
        assert code == 503
        assert "no AWS credentials" in text
        assert relay.find("no_credentials") is not None
    finally:
        assert relay.stop() == 0


def test_readyz_is_ready_with_credentials(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    assert readyz(relay.admin_port) == (200, "ready\n")
    assert relay.find("no_credentials") is None


def test_refused_client_log_line_names_the_setting_to_change(start_relay, sandbox):
    relay = start_relay(sandbox.url, smtp={"allowed_networks": ["192.0.2.0/24"]})
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.mail("app@example.com")[0] == 554
    refused = wait_for(lambda: relay.find("refused"), 20)
    assert "RELAY_SMTP__ALLOWED_NETWORKS" in refused["fix"]
    assert "smtp.allowed_networks" in refused["fix"]


def test_start_up_logs_only_the_relays_own_lines(start_relay, sandbox):
    relay = start_relay(sandbox.url)
    wait_for(lambda: relay.find("listening"), 20)
    loggers = {line.get("logger", "") for line in relay.lines}
    assert loggers and all(name.startswith("relay") for name in loggers), loggers


def test_sandbox_faults_from_the_config_are_played_then_mail_goes_out(start_relay, tmp_path):
    relay = start_relay("sandbox", sandbox={"dir": str(tmp_path / "mail"),
                                            "faults": ["throttle", "5xx"]},
                        delivery={"min_backoff": 0.1, "max_backoff": 0.2, "throttle_retry": 0.1})
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.sendmail("app@example.com", ["you@example.net"],
                   b"From: app@example.com\r\nSubject: faults\r\n\r\nbody\r\n")
    wait_for(lambda: list((tmp_path / "mail").glob("*.eml")), 30)
    assert relay.find("throttled") is not None
    assert any("InternalFailure" in line.get("error", "") for line in relay.events("deferred"))


def test_an_unknown_sandbox_fault_is_a_configuration_error_naming_the_key(tmp_path):
    relay = RelayProcess(tmp_path, relay_sections(tmp_path, "sandbox",
                                                  sandbox={"faults": ["nosuch"]}))
    try:
        relay.start()
    except AssertionError:
        pass  # it never listens: it exits with the error
    assert relay.proc is not None and relay.proc.wait(timeout=30) != 0
    assert any("sandbox.faults" in line and "nosuch" in line for line in relay.raw_lines)
    assert not any("Traceback" in line for line in relay.raw_lines)
