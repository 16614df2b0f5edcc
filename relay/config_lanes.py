"""The [lanes] configuration: named classes of mail, their shares, caps and ingest rules.

Lanes are listed in priority order (first: highest) as `[[lanes.lane]]` tables, rules as
`[[lanes.rule]]` tables (first match wins). With none listed there are two lanes:
transactional (weight 9) and bulk (weight 1, at most 90% of the 24-hour quota). Also the
value rules SES sets for message tags and names, shared with the ingress header parser.
Pure: reads no file. Loaded by relay.config; read by relay.ingress.lanes and the scheduler.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.errors import ConfigError

#: SES: tag names and values, configuration set and tenant names
SES_NAME = re.compile(r"[A-Za-z0-9_-]{1,256}")
SES_SET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_tags(text: str) -> tuple[tuple[str, str], ...]:
    """`name=value, name=value` -> pairs; ValueError naming the bad part."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not SES_NAME.fullmatch(name) or not SES_NAME.fullmatch(value):
            raise ValueError(f"{part[:60]!r} is not name=value with ASCII letters, digits, "
                             "_ and - only, at most 256 characters each")
        out.append((name, value))
    return tuple(out)


@dataclass(frozen=True)
class LaneConfig:
    name: str
    #: share of the rate while several lanes have mail ready
    weight: float = 1.0
    #: recipients per second at most for this lane (0: no cap of its own)
    max_rate: float = 0.0
    #: the lane sends only while the account has used less than this share of its quota
    quota_share: float = 1.0
    #: SendEmail defaults for the lane's mail (the message's X-SES-* headers win)
    configuration_set: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    tenant: str = ""


@dataclass(frozen=True)
class RuleConfig:
    lane: str
    port: int = 0
    user: str = ""
    network: str = ""
    #: an address (user@example.com) or a domain (example.com: it and its subdomains)
    sender: str = ""
    #: "Name" (present) or "Name: value" (the value, case-insensitive; * matches any run)
    header: str = ""
    #: let this header rule move mail into a higher-priority lane
    allow_raise: bool = False


DEFAULT_LANES: tuple[LaneConfig, ...] = (LaneConfig("transactional", weight=9.0),
                 LaneConfig("bulk", weight=1.0, quota_share=0.9))

_LANE_KEYS = {"name": str, "weight": float, "max_rate": float, "quota_share": float,
              "configuration_set": str, "tags": list, "tenant": str}
_RULE_KEYS = {"lane": str, "port": int, "user": str, "network": str, "sender": str,
              "header": str, "allow_raise": bool}


def _typed(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(key, f"must be a {typ.__name__}, got {value!r}")
    return value


def _table(key: str, doc: Any, keys: Mapping[str, type]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError(key, "must be a table")
    out = {}
    for k, v in doc.items():
        if k not in keys:
            raise ConfigError(f"{key}.{k}", f"unknown key; known: {', '.join(keys)}")
        out[k] = _typed(f"{key}.{k}", v, keys[k])
    return out


def _lane(key: str, doc: Any) -> LaneConfig:
    values = _table(key, doc, _LANE_KEYS)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", values.get("name", "")):
        raise ConfigError(f"{key}.name", "must be 1-32 lowercase letters, digits, _ or -")
    tags = values.pop("tags", [])
    try:
        values["tags"] = parse_tags(",".join(str(t) for t in tags))
    except ValueError as exc:
        raise ConfigError(f"{key}.tags", str(exc)) from None
    lane = LaneConfig(**values)
    if lane.weight <= 0:
        raise ConfigError(f"{key}.weight", "must be above 0")
    if lane.max_rate < 0:
        raise ConfigError(f"{key}.max_rate", "must be 0 (no cap) or more")
    if not 0 < lane.quota_share <= 1:
        raise ConfigError(f"{key}.quota_share", "must be a fraction above 0 and at most 1")
    for k in ("configuration_set", "tenant"):
        if getattr(lane, k) and not SES_SET_NAME.fullmatch(getattr(lane, k)):
            raise ConfigError(f"{key}.{k}", "ASCII letters, digits, _ and - only, at most 64")
    return lane


def _rule(key: str, doc: Any, names: set[str]) -> RuleConfig:
    rule = RuleConfig(**_table(key, doc, _RULE_KEYS))
    if rule.lane not in names:
        raise ConfigError(f"{key}.lane", f"no lane named {rule.lane!r}; lanes: "
                          + ", ".join(sorted(names)))
    if not 0 <= rule.port <= 65535:
        raise ConfigError(f"{key}.port", f"must be a port number, got {rule.port}")
    if rule.network:
        try:
            ipaddress.ip_network(rule.network, strict=False)
        except ValueError:
            raise ConfigError(f"{key}.network", f"not a network: {rule.network!r}") from None
    if rule.header and not re.fullmatch(r"[!-9;-~]+(:.*)?", rule.header):
        raise ConfigError(f"{key}.header", f"must be 'Name' or 'Name: value', got "
                          f"{rule.header!r}")
    if not (rule.port or rule.user or rule.network or rule.sender or rule.header):
        raise ConfigError(key, "a rule needs at least one of port, user, network, sender, "
                          "header")
    return rule


@dataclass(frozen=True)
class LanesConfig:
    #: the lane of mail no rule places elsewhere
    default: str = "transactional"
    #: the lane of mail with Precedence: bulk|list|junk or List-Unsubscribe ("": off)
    bulk_lane: str = "bulk"
    lane: tuple[LaneConfig, ...] = DEFAULT_LANES
    rule: tuple[RuleConfig, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The lanes in priority order, highest first."""
        return tuple(lane.name for lane in self.lane)

    def get(self, name: str) -> LaneConfig:
        for lane in self.lane:
            if lane.name == name:
                return lane
        return LaneConfig(name)

    @classmethod
    def from_table(cls, values: Mapping[str, Any], env: Mapping[str, str]) -> LanesConfig:
        top = {k: v for k, v in values.items() if k not in ("lane", "rule")}
        for var in ("RELAY_LANES__DEFAULT", "RELAY_LANES__BULK_LANE"):
            if var in env:
                top[var.split("__")[1].lower()] = env[var]
        for var in env:
            if var.startswith("RELAY_LANES__") and var.split("__")[1].lower() not in top:
                raise ConfigError(f"lanes.{var.split('__')[1].lower()}",
                                  f"unknown key (from environment variable {var})")
        kw = _table("lanes", top, {"default": str, "bulk_lane": str})
        docs = values.get("lane")
        lanes: tuple[LaneConfig, ...] = DEFAULT_LANES
        if docs is not None:
            if not isinstance(docs, list) or not docs:
                raise ConfigError("lanes.lane", "must be a list of [[lanes.lane]] tables")
            lanes = tuple(_lane(f"lanes.lane[{i}]", d) for i, d in enumerate(docs))
        names = [lane.name for lane in lanes]
        if len(set(names)) != len(names):
            raise ConfigError("lanes.lane", f"lane names must be unique: {names}")
        for k in ("default", "bulk_lane"):
            name = kw.get(k, getattr(cls, k))
            if (name or k == "default") and name not in names:
                raise ConfigError(f"lanes.{k}", f"no lane named {name!r}; lanes: "
                                  + ", ".join(names))
        rules = values.get("rule", [])
        if not isinstance(rules, list):
            raise ConfigError("lanes.rule", "must be a list of [[lanes.rule]] tables")
        return cls(lane=lanes, rule=tuple(_rule(f"lanes.rule[{i}]", d, set(names))
                                          for i, d in enumerate(rules)), **kw)
