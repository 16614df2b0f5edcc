"""The console's safety decisions: a POST passes only with this process's CSRF token in
both the cookie and the form and from this origin; a console on a non-loopback admin.host
is read-only without a login; logins by token, by the SMTP AUTH file, and their sessions;
a request naming a host that is not the listener's (DNS rebinding) is refused."""

from __future__ import annotations

import pytest

from relay.ops.console.security import (
    CSP,
    SANDBOX_CSP,
    Guard,
    host_allowed,
    is_loopback,
    same_origin,
)

HOST = "127.0.0.1:8025"


@pytest.mark.parametrize("host, loop", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("relay.internal", False),
])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def test_a_token_from_this_process_in_cookie_and_form_passes():
    g = Guard(host="127.0.0.1")
    token = g.new_csrf()
    assert g.csrf_refusal(token, token, {}, HOST) == ""
    assert g.csrf_refusal(token, token, {"Origin": f"http://{HOST}"}, HOST) == ""
    assert g.csrf_refusal(token, token, {"Referer": f"http://{HOST}/queue"}, HOST) == ""


@pytest.mark.parametrize("case", ["no field", "no cookie", "different", "planted", "origin",
                                  "referer", "null origin"])
def test_posts_without_the_right_token_or_from_elsewhere_are_refused(case):
    g = Guard(host="127.0.0.1")
    token, other = g.new_csrf(), g.new_csrf()
    planted = "0" * 32 + "." + "f" * 64  # a cookie set by someone else: not ours
    cookie, field, headers = {
        "no field": (token, None, {}),
        "no cookie": (None, token, {}),
        "different": (token, other, {}),
        "planted": (planted, planted, {}),
        "origin": (token, token, {"Origin": "http://evil.example"}),
        "referer": (token, token, {"Referer": "http://evil.example/page"}),
        "null origin": (token, token, {"Origin": "null"}),
    }[case]
    reason = g.csrf_refusal(cookie, field, headers, HOST)
    assert reason.startswith("Refused:")


def test_a_token_from_another_process_is_refused():
    assert not Guard(host="127.0.0.1").csrf_valid(Guard(host="127.0.0.1").new_csrf())


def test_origin_check_passes_when_the_browser_sends_neither_header():
    assert same_origin({}, HOST)


def test_non_loopback_without_login_is_read_only_and_names_the_keys():
    g = Guard(host="0.0.0.0")
    assert not g.login_required
    assert "admin.console_token" in g.read_only and "admin.console_login" in g.read_only
    assert Guard(host="127.0.0.1").read_only == ""


def test_non_loopback_with_a_token_needs_a_login_and_takes_it():
    g = Guard(host="0.0.0.0", token="s3cret-token-0123456789")
    assert g.read_only == "" and g.login_required
    assert g.check_login(user="", password="", token="wrong") is None
    assert g.check_login(user="", password="", token="s3cret-token-0123456789") == "token"
    assert g.bearer_user("Bearer s3cret-token-0123456789") == "token"
    assert g.bearer_user("Bearer nope") is None
    assert g.bearer_user("Basic s3cret-token-0123456789") is None


def test_credentials_login_and_sessions_expire():
    now = [1000.0]
    g = Guard(host="10.0.0.5", verify=lambda u, p: (u, p) == ("ops", "pw"),
              clock=lambda: now[0])
    assert g.login_required and g.read_only == ""
    assert g.check_login(user="ops", password="bad", token="") is None
    assert g.check_login(user="ops", password="pw", token="") == "ops"
    assert g.check_login(user="", password="", token="anything") is None  # no token set
    cookie = g.session("ops")
    assert g.session_user(cookie) == "ops"
    assert g.session_user(cookie.replace("ops", "root", 1)) is None  # forged name
    now[0] += 13 * 3600
    assert g.session_user(cookie) is None


def test_policies_block_scripts_and_remote_content_in_sandbox_html():
    assert "default-src 'none'" in SANDBOX_CSP and "sandbox" in SANDBOX_CSP
    assert "script-src" not in SANDBOX_CSP and "img-src data:" in SANDBOX_CSP
    assert "frame-ancestors 'none'" in CSP


def test_credentials_login_checks_the_smtp_auth_file(tmp_path):
    from relay import config
    from relay.ingress.credentials import set_password
    from relay.ops.console.wiring import login_guard

    users = tmp_path / "users"
    set_password(users, "ops", "correct horse")
    path = tmp_path / "relay.toml"
    path.write_text(f'[smtp]\nauth_file = "{users}"\n[admin]\nhost = "0.0.0.0"\n'
                    'console_login = "credentials"\n')
    g = login_guard(config.load(path, env={}))
    assert g.login_required and g.read_only == ""
    assert g.check_login(user="ops", password="correct horse", token="") == "ops"
    assert g.check_login(user="ops", password="wrong", token="") is None


@pytest.mark.parametrize("target, ok", [
    ("/", True), ("/queue?state=hold&lane=bulk", True), ("//evil.example/", False),
    ("/\\evil.example", False), ("https://evil.example/", False), ("queue", False),
    ("/x\r\nSet-Cookie: a=b", False),
])
def test_after_login_the_redirect_stays_on_the_console(target, ok):
    from relay.ops.console.pages import local_path

    assert local_path(target) is ok


@pytest.mark.parametrize("header, ok", [
    ("127.0.0.1:8025", True), ("127.0.0.1", True), ("localhost:8025", True),
    ("LOCALHOST", True), ("[::1]:8025", True), ("[::1]", True), ("10.0.0.5:9000", True),
    ("relay.internal:8025", True), ("relay.internal", True), ("admin.example:443", True),
    ("evil.example:8025", False), ("evil.example", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io:8025", False), ("relay.internal.evil.example", False), ("", False),
    (None, False),
])
def test_only_the_listeners_names_and_ip_literals_pass_the_host_check(header, ok):
    names = ("relay.internal", "Admin.Example")
    assert host_allowed(header, names) is ok
    g = Guard(host="relay.internal", allowed_hosts=("Admin.Example",))
    refusal = g.host_refusal(header)
    assert (refusal == "") is ok
    if not ok:
        assert refusal.startswith("Refused:") and "admin.allowed_hosts" in refusal


def test_a_rebound_name_is_refused_on_the_default_loopback_listener():
    g = Guard(host="127.0.0.1")
    assert g.host_refusal("127.0.0.1:8025") == "" and g.host_refusal("localhost") == ""
    assert "'evil.example:8025'" in g.host_refusal("evil.example:8025")
    assert Guard(host="::1").host_refusal("[::1]:8025") == ""
