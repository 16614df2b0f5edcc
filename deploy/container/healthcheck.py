#!/usr/bin/env python3
"""The image's health check: GET /healthz on the admin listener, wherever it listens.

The address comes from the same places as the relay's: `-c FILE` on process 1's command
line, else $RELAY_CONFIG, else conf/relay.toml; then RELAY_ADMIN__HOST/PORT/ENABLED
override the file. A wildcard host is probed on loopback. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.request


def config_path() -> str | None:
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            args = fh.read().decode(errors="replace").split("\0")
    except OSError:
        args = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    if os.environ.get("RELAY_CONFIG"):
        return os.environ["RELAY_CONFIG"]
    return "conf/relay.toml" if os.path.exists("conf/relay.toml") else None


def admin_address() -> tuple[bool, str, int]:
    admin: dict[str, object] = {}
    path = config_path()
    if path:
        with open(path, "rb") as fh:
            admin = tomllib.load(fh).get("admin", {})
    enabled = str(os.environ.get("RELAY_ADMIN__ENABLED", admin.get("enabled", True)))
    host = str(os.environ.get("RELAY_ADMIN__HOST", admin.get("host", "127.0.0.1")))
    port = int(str(os.environ.get("RELAY_ADMIN__PORT", admin.get("port", 8025))))
    wildcard = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
    return enabled.lower() not in ("0", "false", "no", "off"), wildcard.get(host, host), port


def main() -> int:
    try:
        enabled, host, port = admin_address()
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"healthcheck: cannot read the admin address: {exc}", file=sys.stderr)
        return 1
    if not enabled:
        print("healthcheck: admin.enabled is false: nothing to probe")
        return 0
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            print(f"healthcheck: {url}: {resp.status}")
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
