"""A tiny escaping helper for the console's views: Markup is HTML already safe to print,
everything else is escaped by esc() / h() on the way in. No template engine.

h("<td>{}</td>", value) escapes value; h() of Markup leaves it alone, so views compose.
Used by every relay.ops.console view module.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from relay.ops.queue_cli import ago as ago


class Markup(str):
    """A string of HTML that needs no more escaping; what is added to it is escaped."""

    __slots__ = ()

    def __add__(self, other: str) -> Markup:
        return Markup(str.__add__(self, esc(other)))


def esc(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def h(template: str, *args: Any, **kwargs: Any) -> Markup:
    """template.format with every argument escaped (Markup arguments stay as they are)."""
    return Markup(template.format(*(esc(a) for a in args),
                                  **{k: esc(v) for k, v in kwargs.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(esc(p) for p in parts))


def url(path: str, **query: Any) -> str:
    """A path with its query string (empty values left out); escape it when printed."""
    q = {k: v for k, v in query.items() if v not in (None, "")}
    return f"{path}?{urlencode(q)}" if q else path


def when(at: float | None) -> str:
    """A UTC timestamp as 2026-12-01 18:20:40Z; '-' for none."""
    if not at:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def pct(x: float) -> str:
    return f"{x * 100:.2f}%"


NAV = (("/", "Overview"), ("/queue", "Queue"), ("/log", "Log"),
       ("/suppressions", "Suppressions"), ("/sandbox", "Sandbox mail"))


def page(title: str, body: Markup, *, here: str = "/", flash: str = "",
         banner: Markup | None = None, user: str = "") -> Markup:
    """The whole HTML document around a page's body."""
    nav = join(h('<a href="{}"{}>{}</a>', path, Markup(' class="here"' if path == here else ""),
                 name) for path, name in NAV)
    who = h('<span class="who">{} · <a href="/logout">log out</a></span>', user) if user else ""
    note = h('<p id="flash" role="status">{}</p>', flash) if flash else ""
    return h(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{} · relay</title><link rel="stylesheet" href="/static/console.css">'
        '</head><body><header><strong class="brand">relay</strong><nav>{}</nav>{}</header>'
        '{}<main>{}<h1>{}</h1>{}</main></body></html>\n',
        title, nav, who, banner or Markup(""), note, title, body)


def hidden_csrf(token: str) -> Markup:
    return h('<input type="hidden" name="csrf" value="{}">', token)


def table(tid: str, head: Iterable[str], rows: Iterable[Markup], *,
          empty: str = "nothing here") -> Markup:
    cells = join(h("<th>{}</th>", c) for c in head)
    body = join(rows)
    if not body:
        body = h('<tr class="empty"><td colspan="99">{}</td></tr>', empty)
    return h('<table id="{}"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
             tid, cells, body)
