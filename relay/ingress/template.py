"""aiosmtpd's per-connection set-up, done once per listener instead of once per connection.

aiosmtpd's SMTP.__init__ scans the session and the handler (inspect.getmembers, dir()),
reads handle_EHLO's signature and formats an "Available AUTH mechanisms" log line for
every connection: about 30 us, an eighth of the SMTP loop's CPU with a connection per
message. What it sets depends only on the listener's options, so a Template runs it once,
on a prototype, and each new session copies the result: a fresh StreamReaderProtocol
state, the plain values shared, and what aiosmtpd bound to the prototype (the verb table,
the built-in AUTH mechanisms) bound again to the new session. Used by
relay.ingress.session.RelaySession; tests/unit/test_session_template.py compares a session
made this way with one made by aiosmtpd's own __init__, attribute by attribute.
"""

from __future__ import annotations

import asyncio
import ssl
import types
from typing import Any

from aiosmtpd.smtp import SMTP

#: values a session may share with every other one (nothing in them changes per session)
_SHARED = (type(None), bool, int, float, str, bytes, types.FunctionType,
           types.BuiltinFunctionType, ssl.SSLContext)


def _rebind(value: Any, proto: object, new: object) -> Any:
    """`value` with every method bound to `proto` bound to `new` instead (dicts copied)."""
    if isinstance(value, types.MethodType) and value.__self__ is proto:
        return types.MethodType(value.__func__, new)
    if type(value) is dict:
        return {k: _rebind(v, proto, new) for k, v in value.items()}
    if isinstance(value, tuple):
        items = [_rebind(v, proto, new) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _needs_rebind(value: Any, proto: object) -> bool:
    """`value` holds a method bound to `proto`, or a dict (a session must have its own)."""
    if isinstance(value, types.MethodType):
        return value.__self__ is proto
    if type(value) is dict:
        return True
    if isinstance(value, tuple):
        return any(_needs_rebind(v, proto) for v in value)
    return False


def _refers(value: Any, proto: object, depth: int = 0) -> bool:
    """`value` holds `proto` somewhere other than as a method's self (not rebindable)."""
    if value is proto:
        return True
    if depth > 4:
        return False
    if isinstance(value, types.MethodType):
        return value.__self__ is not proto and _refers(value.__self__, proto, depth + 1)
    if isinstance(value, dict):
        return any(_refers(v, proto, depth + 1) for v in value.values())
    if isinstance(value, tuple | list | set | frozenset):
        return any(_refers(v, proto, depth + 1) for v in value)
    return False


class Template:
    """What aiosmtpd's SMTP.__init__ gives a session of one listener, made once.

    `fast` is False when aiosmtpd set something this cannot copy safely (a value that
    refers to the session itself, or a mutable object of an unknown kind): then every
    session runs aiosmtpd's own __init__, as before.
    """

    def __init__(self, cls: type[SMTP], handler: Any, options: dict[str, Any]) -> None:
        self.cls = cls
        self.handler = handler
        self.options = options
        self.loop: asyncio.AbstractEventLoop = options["loop"]
        proto = cls.__new__(cls)
        SMTP.__init__(proto, handler, **options)
        # StreamReaderProtocol's own state is made fresh for each session
        own = set(vars(asyncio.StreamReaderProtocol(
            asyncio.StreamReader(loop=self.loop), client_connected_cb=proto._cb_client_connected,
            loop=self.loop)))
        #: set as they are on each session
        self.shared: dict[str, Any] = {}
        #: methods bound to the session: attribute -> function
        self.methods: dict[str, Any] = {}
        #: dicts copied for each session: attribute -> (the dict, its keys holding a
        #: method of the session -> function, its keys holding one deeper down)
        self.tables: dict[str, tuple[dict[Any, Any], dict[Any, Any], list[Any]]] = {}
        #: why a session cannot be made from the template ("" when it can)
        self.unsafe = ""
        keep = (handler, self.loop)
        for name, value in vars(proto).items():
            if name in own:
                continue
            if _refers(value, proto):
                self.unsafe = f"{name} refers to the session"
            elif isinstance(value, types.MethodType) and value.__self__ is proto:
                self.methods[name] = value.__func__
            elif type(value) is dict:
                direct = {k: v.__func__ for k, v in value.items()
                          if isinstance(v, types.MethodType) and v.__self__ is proto}
                deeper = [k for k, v in value.items()
                          if k not in direct and _needs_rebind(v, proto)]
                self.tables[name] = (value, direct, deeper)
            elif isinstance(value, _SHARED) or any(value is k for k in keep) or (
                    isinstance(value, tuple) and all(isinstance(v, _SHARED) for v in value)):
                self.shared[name] = value
            else:
                self.unsafe = f"{name} is a {type(value).__name__}"
        self.proto = proto

    @property
    def fast(self) -> bool:
        return not self.unsafe

    def apply(self, session: SMTP) -> None:
        """Give `session` what aiosmtpd's SMTP.__init__ would have, with these options."""
        if not self.fast:
            SMTP.__init__(session, self.handler, **self.options)
            return
        reader = getattr(self.cls, "reader_class", asyncio.StreamReader)
        asyncio.StreamReaderProtocol.__init__(
            session, reader(loop=self.loop, limit=self.cls.line_length_limit),
            client_connected_cb=session._cb_client_connected, loop=self.loop)
        state = vars(session)
        state.update(self.shared)
        method = types.MethodType
        for name, func in self.methods.items():
            state[name] = method(func, session)
        for name, (table, direct, deeper) in self.tables.items():
            copy = table.copy()
            for key, func in direct.items():
                copy[key] = method(func, session)
            for key in deeper:
                copy[key] = _rebind(table[key], self.proto, session)
            state[name] = copy
        # aiosmtpd clears this class-level table on every connection; so does this
        session.command_size_limits.clear()
