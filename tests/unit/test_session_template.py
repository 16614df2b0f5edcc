"""A session set up from its listener's Template equals one set up by aiosmtpd's own __init__.

relay.ingress.template copies what aiosmtpd's SMTP.__init__ sets instead of running it for
each connection. These tests build both kinds of session with the options the listener
uses and compare them attribute by attribute, so an aiosmtpd that sets something new,
renames something or binds something differently fails here (not in production).
"""

from __future__ import annotations

import asyncio
import ssl
import types
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relay.config import SmtpConfig
from relay.ingress.credentials import Credentials
from relay.ingress.server import Ingress, IngressHandler
from relay.ingress.session import RelaySession
from relay.ingress.template import Template
from relay.spool.spool import Spool

#: values that are the same object in every session of a listener
SHARED_TYPES = (type(None), bool, int, float, str, bytes, tuple, types.FunctionType,
                ssl.SSLContext, IngressHandler, asyncio.AbstractEventLoop)


def same(a: Any, b: Any, sa: object, sb: object) -> bool:
    """a (from session sa) is what b is (from session sb), each bound to its own session."""
    if isinstance(a, types.MethodType):
        return (isinstance(b, types.MethodType) and a.__func__ is b.__func__
                and (a.__self__ is sa) == (b.__self__ is sb)
                and (a.__self__ is sa or a.__self__ is b.__self__))
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(same(a[k], b[k], sa, sb) for k in a))
    if isinstance(a, tuple):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y, sa, sb) for x, y in zip(a, b, strict=True)))
    if isinstance(a, asyncio.StreamReader | asyncio.Future):
        # the template's reader is the session's own kind (relay.ingress.data.SessionReader)
        return isinstance(a, type(b)) and a is not b
    if isinstance(a, SHARED_TYPES):
        return bool(a == b)
    return type(a) is type(b) and a is not b


def listener(tmp_path: Path, *, tls: bool, credentials: bool) -> Ingress:
    fields: dict[str, Any] = {"hostname": "relay.test"}
    config = SmtpConfig(**fields)
    handler = IngressHandler(
        spool=Spool(tmp_path / "spool", fsync=False, min_free_bytes=0), config=config,
        credentials=Credentials(tmp_path / "users") if credentials else None)
    ingress = Ingress(handler, config)
    if tls:
        ingress.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    return ingress


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("credentials", [False, True])
@pytest.mark.parametrize("implicit_tls", [False, True])
async def test_a_session_from_the_template_equals_one_from_aiosmtpds_init(
        tmp_path, tls, credentials, implicit_tls):
    if credentials:
        (tmp_path / "users").write_text("")
    ingress = listener(tmp_path, tls=tls, credentials=credentials)
    options = ingress.session_options(implicit_tls=implicit_tls)
    template = Template(RelaySession, ingress.handler, options)
    assert template.fast, template.unsafe
    slow = RelaySession.__new__(RelaySession)
    SMTP.__init__(slow, ingress.handler, **options)
    SMTP.command_size_limits["MAIL"] += 36  # what an EHLO elsewhere leaves behind
    fast = RelaySession.__new__(RelaySession)
    template.apply(fast)
    # aiosmtpd clears its class-level command size table for each new session
    assert dict(SMTP.command_size_limits) == {}
    assert sorted(vars(fast)) == sorted(vars(slow))
    differ = [name for name in vars(slow)
              if not same(vars(fast)[name], vars(slow)[name], fast, slow)]
    assert differ == []


async def test_two_sessions_from_one_template_share_nothing_that_changes(tmp_path):
    (tmp_path / "users").write_text("")
    ingress = listener(tmp_path, tls=True, credentials=True)
    template = Template(RelaySession, ingress.handler,
                        ingress.session_options(implicit_tls=False))
    a, b = RelaySession.__new__(RelaySession), RelaySession.__new__(RelaySession)
    template.apply(a)
    template.apply(b)
    shared = [name for name, value in vars(a).items()
              if not isinstance(value, SHARED_TYPES) and value is vars(b)[name]]
    assert shared == []
    # each verb runs on its own session
    assert a._smtp_methods["QUIT"].__self__ is a
    assert b._smtp_methods["QUIT"].__self__ is b


async def test_a_listener_makes_its_sessions_from_one_template(tmp_path):
    ingress = listener(tmp_path, tls=False, credentials=False)
    first, second = ingress._plain(), ingress._plain()
    assert len(ingress._templates) == 1
    assert first._smtp_methods["DATA"].__self__ is first
    assert second._smtp_methods["DATA"].__self__ is second
    # what aiosmtpd would have found: the relay's own DATA, the handler's hooks
    assert first._smtp_methods["DATA"].__func__ is RelaySession.smtp_DATA
    assert first._handle_hooks["DATA"] == ingress.handler.handle_DATA
    assert sorted(first._auth_methods) == []


async def test_what_the_template_cannot_copy_safely_makes_each_session_run_aiosmtpds_init(
        tmp_path):
    """An option whose value the template cannot tell is safe to share (here an
    authenticator object) is not copied: each session runs aiosmtpd's own __init__."""

    class Authenticator:
        def __call__(self, *args: Any) -> Any:
            return None

    ingress = listener(tmp_path, tls=False, credentials=False)
    options = {**ingress.session_options(implicit_tls=False), "authenticator": Authenticator()}
    template = Template(RelaySession, ingress.handler, options)
    assert not template.fast and "_authenticator" in template.unsafe
    session = RelaySession.__new__(RelaySession)
    template.apply(session)
    assert session._authenticator is options["authenticator"]
    assert session._smtp_methods["DATA"].__self__ is session
