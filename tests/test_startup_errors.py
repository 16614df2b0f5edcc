"""A relay that cannot start says so in one line and exits non-zero, before it changes
anything; `relay check` finds the same problem first. Each case runs the real command in a
child process: a port in use, a read-only or immutable spool, a spool path that is a file,
a database file that cannot be opened, `-c` given a directory or a missing file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, write_config

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, chattr)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def config(tmp: Path, spool: Path, **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "smtp": {"host": "127.0.0.1", "port": 0},
        "spool": {"dir": str(spool), "min_free_bytes": 0},
        "ses": {"endpoint_url": "sandbox"},
        "admin": {"host": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_config(tmp / "relay.toml", base)


def fails_in_one_line(proc: subprocess.CompletedProcess[str], prefix: str, words: str,
                      status: int = 1) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]
    return lines[0]


def serve_and_check_fail(cfg: Path, words: str) -> None:
    fails_in_one_line(run("check", "-c", str(cfg)), "check: ", words)
    fails_in_one_line(run("serve", "-c", str(cfg)), "relay serve: ", words)


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_named_before_recovery_touches_the_spool(tmp_path, listening):
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    half = spool / "incoming" / "0123-half-written"
    half.write_text("a message another relay is still writing")
    cfg = config(tmp_path, spool, smtp={"port": listening})
    serve_and_check_fail(cfg, f"smtp.port 127.0.0.1:{listening} cannot be used "
                              "(Address already in use): stop what holds it or choose another")
    assert half.exists()  # recovery never ran
    assert not list(spool.glob("relay.db*"))  # nor the migrations


def test_an_admin_port_in_use_is_named(tmp_path, listening):
    cfg = config(tmp_path, tmp_path / "spool", admin={"port": listening})
    serve_and_check_fail(cfg, f"admin.port 127.0.0.1:{listening} cannot be used")


def test_a_spool_path_that_is_a_file_is_named(tmp_path):
    spool = tmp_path / "spool"
    spool.write_text("not a directory")
    serve_and_check_fail(config(tmp_path, spool),
                         f"spool.dir {spool} is a file, not a directory: move it away")


@ROOT_ONLY
def test_a_spool_on_a_read_only_file_system_is_named(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        serve_and_check_fail(config(tmp_path, mnt / "spool"),
                             f"spool.dir {mnt / 'spool'} is not writable (Read-only file "
                             f"system at {mnt / 'spool'}): make it writable")
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


@ROOT_ONLY
def test_a_missing_spool_under_an_immutable_directory_is_named(tmp_path):
    parent = tmp_path / "frozen"
    parent.mkdir()
    subprocess.run(["chattr", "+i", str(parent)], check=True, timeout=30)
    try:
        serve_and_check_fail(config(tmp_path, parent / "spool"),
                             f"spool.dir {parent / 'spool'} is not writable (Operation not "
                             "permitted")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True, timeout=30)


@ROOT_ONLY
def test_an_immutable_spool_directory_is_named(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["chattr", "+i", str(spool)], check=True, timeout=30)
    try:
        serve_and_check_fail(config(tmp_path, spool),
                             f"spool.dir {spool} is not writable (Operation not permitted at "
                             f"{spool})")
    finally:
        subprocess.run(["chattr", "-i", str(spool)], check=True, timeout=30)


def test_a_database_path_that_cannot_be_opened_is_named(tmp_path):
    db = tmp_path / "relay.db"
    db.mkdir()
    cfg = config(tmp_path, tmp_path / "spool", database={"url": f"sqlite:///{db}"})
    serve_and_check_fail(cfg, f"database.url: {db} is not a file")


@ROOT_ONLY
def test_a_database_file_that_cannot_be_written_is_named(tmp_path):
    db = tmp_path / "relay.db"
    db.write_bytes(b"")
    subprocess.run(["chattr", "+i", str(db)], check=True, timeout=30)
    try:
        cfg = config(tmp_path, tmp_path / "spool", database={"url": f"sqlite:///{db}"})
        serve_and_check_fail(cfg, f"database.url: {db} cannot be read and written")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True, timeout=30)


@pytest.mark.parametrize("command", ["serve", "check"])
def test_config_given_a_directory_or_a_missing_file_is_named(tmp_path, command):
    fails_in_one_line(run(command, "-c", str(tmp_path)), "relay: configuration error: ",
                      f"config: {tmp_path} is a directory: give -c a TOML file", status=2)
    missing = tmp_path / "nowhere.toml"
    fails_in_one_line(run(command, "-c", str(missing)), "relay: configuration error: ",
                      f"config: file not found: {missing}", status=2)


def test_check_says_ok_when_serve_could_start(tmp_path):
    proc = run("check", "-c", str(config(tmp_path, tmp_path / "spool")))
    assert proc.returncode == 0, proc.stderr
    assert "database: ok" in proc.stdout
