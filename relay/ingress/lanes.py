"""The lane of a message and its SES options, decided at the end of DATA.

decide() applies the [lanes] rules (listener port, AUTH user, client network, envelope
sender, header; first match wins) to a message's facts; a header rule may only move mail
into a lower-priority lane unless the rule allows it. ses_options() turns the X-SES-*
headers SES documents for raw mail into SendEmail parameters over the lane's defaults,
and strip() removes those headers from the bytes sent. Pure; called by
relay.ingress.server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from relay.config_lanes import SES_NAME, SES_SET_NAME, LanesConfig, RuleConfig, parse_tags
from relay.ingress.headers import Split, split
from relay.ingress.replies import Reply
from relay.spool.record import SesOptions

#: the headers that become SendEmail parameters, lowercased
SES_HEADERS = (b"x-ses-configuration-set", b"x-ses-message-tags", b"x-ses-tenant-name",
               b"x-ses-list-management-options")
BULK_PRECEDENCE = ("bulk", "list", "junk")
#: an X-SES-* header SES would refuse: permanent, nothing queued, the session goes on
BAD_SES_HEADER = Reply(554, "5.6.0", "Message refused, malformed header")


@dataclass(frozen=True)
class Facts:
    """What a lane rule can match on."""

    port: int = 0
    user: str = ""
    client: str = ""
    sender: str = ""
    #: (lowercased name, unfolded value) of each header field, in order
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


class BadSesHeader(ValueError):
    """An X-SES-* header SES would refuse; `header` names it."""

    def __init__(self, header: str, reason: str) -> None:
        super().__init__(f"{header}: {reason}")
        self.header = header
        self.reason = reason


def header_fields(data: bytes, parts: Split | None = None) -> tuple[tuple[str, str], ...]:
    """The message's header fields as (lowercased name, unfolded value); `parts` is
    split(data) when the caller has it already."""
    out = []
    for raw in (split(data) if parts is None else parts).fields:
        name, _, value = raw.partition(b":")
        text = re.sub(r"\r?\n[ \t]", " ", value.decode("latin-1")).strip()
        out.append((name.strip().decode("latin-1").lower(), text))
    return tuple(out)


def _header_matches(pattern: str, facts: Facts) -> bool:
    name, colon, want = pattern.partition(":")
    values = facts.header(name.strip())
    if not colon:
        return bool(values)
    rx = re.compile(".*".join(re.escape(p) for p in want.strip().split("*")), re.IGNORECASE)
    return any(rx.fullmatch(v) for v in values)


def _sender_matches(want: str, sender: str) -> bool:
    want, sender = want.lower(), sender.lower()
    if "@" in want:
        return sender == want
    domain = sender.rpartition("@")[2]
    return domain == want or domain.endswith("." + want)


def _network_matches(network: str, client: str) -> bool:
    try:
        return ipaddress.ip_address(client) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def matches(rule: RuleConfig, facts: Facts) -> bool:
    """Every condition the rule sets holds for the message."""
    return ((not rule.port or rule.port == facts.port)
            and (not rule.user or rule.user == facts.user)
            and (not rule.network or _network_matches(rule.network, facts.client))
            and (not rule.sender or _sender_matches(rule.sender, facts.sender))
            and (not rule.header or _header_matches(rule.header, facts)))


def is_bulk(facts: Facts) -> bool:
    """The marks every newsletter carries: Precedence bulk|list|junk, List-Unsubscribe."""
    if facts.header("list-unsubscribe"):
        return True
    return any(v.strip().lower() in BULK_PRECEDENCE for v in facts.header("precedence"))


def decide(cfg: LanesConfig, facts: Facts) -> str:
    """The message's lane: the first matching rule; a header (which the sender writes)
    never raises mail above the lane the other facts give it, unless allowed."""
    rank = {name: i for i, name in enumerate(cfg.names)}
    baseline = next((r.lane for r in cfg.rule if not r.header and matches(r, facts)),
                    cfg.default)
    for rule in cfg.rule:
        if not matches(rule, facts):
            continue
        if rule.header and not rule.allow_raise and rank[rule.lane] < rank[baseline]:
            continue
        return rule.lane
    if cfg.bulk_lane and is_bulk(facts) and rank[cfg.bulk_lane] >= rank[baseline]:
        return cfg.bulk_lane
    return baseline


def ses_options(cfg: LanesConfig, lane: str, facts: Facts) -> SesOptions:
    """The SendEmail parameters: the message's X-SES-* headers over the lane's defaults.
    Raises BadSesHeader for a value SES would refuse."""
    defaults = cfg.get(lane)
    opts = {"configuration_set": defaults.configuration_set, "tenant": defaults.tenant,
            "contact_list": "", "topic": ""}
    tags = dict(defaults.tags)
    for name, value in facts.headers:
        if name == "x-ses-configuration-set":
            opts["configuration_set"] = _name("X-SES-CONFIGURATION-SET", value)
        elif name == "x-ses-tenant-name":
            opts["tenant"] = _name("X-SES-TENANT-NAME", value)
        elif name == "x-ses-message-tags":
            try:
                tags.update(parse_tags(value))
            except ValueError as exc:
                raise BadSesHeader("X-SES-MESSAGE-TAGS", str(exc)) from None
        elif name == "x-ses-list-management-options":
            opts["contact_list"], opts["topic"] = _list_management(value)
    return SesOptions(tags=tuple(tags.items()), **opts)


def _name(header: str, value: str) -> str:
    value = value.strip()
    if not SES_SET_NAME.fullmatch(value):
        raise BadSesHeader(header, "must be ASCII letters, digits, _ and - only, at most 64")
    return value


def _list_management(value: str) -> tuple[str, str]:
    """`contactListName; topic=topicName` (the topic is optional)."""
    contact, _, rest = value.partition(";")
    contact, rest = contact.strip(), rest.strip()
    topic = ""
    if rest:
        key, eq, topic = rest.partition("=")
        topic = topic.strip()
        if key.strip().lower() != "topic" or not eq or not SES_NAME.fullmatch(topic):
            raise BadSesHeader("X-SES-LIST-MANAGEMENT-OPTIONS",
                               "must be 'contactListName; topic=topicName'")
    if not SES_NAME.fullmatch(contact):
        raise BadSesHeader("X-SES-LIST-MANAGEMENT-OPTIONS",
                           "the contact list name must be ASCII letters, digits, _ and -")
    return contact, topic


def strip(data: bytes, parts: Split | None = None) -> bytes:
    """The message without its X-SES-* parameter headers (SES takes them as parameters):
    `data` itself when it has none; `parts` is split(data) when the caller has it."""
    parts = split(data) if parts is None else parts
    names = parts.names()
    if not any(n in SES_HEADERS for n in names):
        return data
    kept = [f for f, n in zip(parts.fields, names, strict=True) if n not in SES_HEADERS]
    return b"".join(kept) + parts.rest
