"""Structured logs: one JSON line per outcome, recipients hashed, never in clear.

event() is the one way the relay reports an outcome (accepted, sent, deferred, failed,
...). Addresses are replaced by a short SHA-256 prefix of the lower-cased address, enough
to correlate lines about one recipient without writing it out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

RECIPIENT_KEYS = ("recipient", "recipients", "sender")


@functools.lru_cache(maxsize=4096)
def hash_address(addr: str) -> str:
    # remembered: the same senders and recipients come in line after line
    return hashlib.sha256(addr.strip().lower().encode()).hexdigest()[:16]


def _hashed(value: Any) -> Any:
    if isinstance(value, str):
        return hash_address(value)
    if isinstance(value, Iterable):
        return [hash_address(v) for v in value]
    return value


def event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one outcome as a JSON line; sender and recipient values are hashed."""
    if not logger.isEnabledFor(level):
        return
    for key in RECIPIENT_KEYS:
        if key in fields:
            fields[key] = _hashed(fields[key])
    logger.log(level, name, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, default=str)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libraries that narrate their own start-up (alembic lists its plugins on every start)
    for noisy in ("botocore", "aiobotocore", "aioboto3", "mail.log", "aiohttp.access", "asyncio",
                  "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
    # JsonFormatter reads none of the caller's file and line, thread or process: not
    # computing them per line saves a stack walk and three lookups (~8 us a line)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
