"""Config values: a TOML value or an environment string turned into a setting's type.

One coercer per type (bool, int, float, str, list of strings), plus durations ("5m"),
sizes ("10MB") and counts that may be "auto" chosen by a field's metadata. TOML values
must already have their type; environment strings are parsed. A wrong value raises
ConfigError naming the key and what was expected. Pure: reads no file. Called by
relay.config for every key it loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from relay.errors import ConfigError

#: the value of ses.endpoint_url (and feedback.sqs_endpoint_url) that starts the embedded sandbox
SANDBOX = "sandbox"

#: (key, value, from_env) -> the value in its type, or ConfigError
Coercer = Callable[[str, Any, bool], Any]

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
    "gb": 1024**3,
}
_TRUE = ("1", "true", "yes", "on")
#: the most a count that may be "auto" may be (smtp.workers: worker processes)
MAX_COUNT = 64
_FALSE = ("0", "false", "no", "off")


def parse_duration(key: str, value: Any) -> float:
    """Seconds from a number or a string such as "300", "30s", "5m", "5d", "250ms"."""
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a duration such as 30s, 5m or 5d, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
        if not m:
            raise ConfigError(key, f"must be a duration such as 30s, 5m or 5d, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return seconds


def parse_size(key: str, value: Any) -> int:
    """Bytes from a number or a string such as "10MB", "512k"."""
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a size such as 10MB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(key, f"must be a size such as 10MB or 512KB, got {value!r}")
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if n < 0:
        raise ConfigError(key, "must not be negative")
    return n


def _bool(key: str, value: Any, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).lower()
    if from_env and word in _TRUE:
        return True
    if from_env and word in _FALSE:
        return False
    raise ConfigError(key, f"must be true or false, got {value!r}")


def _int(key: str, value: Any, from_env: bool) -> int:
    # bool is an int to Python, never to an operator
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if from_env and re.fullmatch(r"-?\d+", str(value).strip()):
        return int(value)
    raise ConfigError(key, f"must be an integer, got {value!r}")


def _float(key: str, value: Any, from_env: bool) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if from_env:
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(key, f"must be a number, got {value!r}")


def _str(key: str, value: Any, from_env: bool) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(key, f"must be a string, got {value!r}")


def _strings(key: str, value: Any, from_env: bool) -> tuple[str, ...]:
    # the environment has no lists: a comma-separated string stands for one
    if from_env and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(key, f"must be a list of strings, got {value!r}")


#: a setting's declared type -> its coercer
COERCERS: dict[Any, Coercer] = {
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
    tuple[str, ...]: _strings,
}


def _auto_int(key: str, value: Any, from_env: bool) -> int:
    """A count or "auto" (0: resolved by relay.config), as smtp.workers takes it."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        n = _int(key, value, from_env)
    except ConfigError:
        raise ConfigError(key, f'must be "auto" or an integer, got {value!r}') from None
    if not 1 <= n <= MAX_COUNT:
        raise ConfigError(key, f'must be "auto" or between 1 and {MAX_COUNT}, got {value!r}')
    return n


def coerce(key: str, f: dataclasses.Field[Any], typ: Any, value: Any, *, from_env: bool) -> Any:
    """`value` for the setting `key` (dataclass field `f` of type `typ`), in its type."""
    if f.metadata.get("auto"):
        return _auto_int(key, value, from_env)
    if f.metadata.get("duration"):
        return parse_duration(key, value)
    if f.metadata.get("size"):
        return parse_size(key, value)
    coercer = COERCERS.get(typ)
    if coercer is None:  # pragma: no cover - a new setting of a type with no coercer
        raise ConfigError(key, f"unsupported type {typ!r}")
    return coercer(key, value, from_env)
