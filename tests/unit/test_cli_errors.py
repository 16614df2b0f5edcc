"""What an operator reads when a command is used wrongly: the exit status and the exact
error line of `relay queue ...` and `relay suppression ...`, run in process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.ops.cli import main
from relay.spool.spool import Spool
from relay.store.db import Database


@pytest.fixture
def config(tmp_path: Path) -> Path:
    Spool(tmp_path / "spool").ensure()

    async def create() -> None:  # as `relay serve` would have
        await (await Database.open("", tmp_path / "spool")).close()

    asyncio.run(create())
    path = tmp_path / "relay.toml"
    path.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n')
    return path


@pytest.mark.parametrize(
    "argv, status, error",
    [
        (["queue", "retry"], 1, "relay queue: retry: give one or more queue ids, `-` to read "
         "them from standard input, or --all"),
        (["queue", "hold"], 1, "relay queue: hold: give one or more queue ids, `-` to read "
         "them from standard input, or --all"),
        (["queue", "hold", "0123", "-"], 1,
         "relay queue: `-` (ids on standard input) stands alone"),
        (["queue", "hold", "0123", "--state", "active"], 1,
         "relay queue: --state goes with --all"),
        (["queue", "hold", "0123", "--lane", "bulk"], 1,
         "relay queue: give queue ids, --lane or --all, one of them"),
        (["queue", "retry", "0123", "--all"], 1, "relay queue: give queue ids or --all, not both"),
        (["queue", "release", "--all"], 0, "release: nothing in hold/"),
        (["queue", "delete", "--all"], 0,
         "delete: nothing in active/, deferred/, hold/, failed/, corrupt/"),
        (["queue", "delete", "0123"], 1, "relay queue: delete: 1 message(s): refusing without "
         "--yes (standard input is not a terminal)"),
        (["queue", "list", "--older-than", "soon"], 2,
         "relay queue: --older-than: must be a number with a unit (ms, s, m, h or d), such "
         "as 30s, 5m, 2h or 1d; got 'soon'"),
        (["suppression", "add", "nobody"], 1, "relay: not an email address: 'nobody'"),
        (["suppression", "remove", "a@example.com"], 1,
         "relay: not on the suppression list: a@example.com"),
    ],
)
def test_a_wrong_command_says_what_is_wrong(config, capsys, argv, status, error):
    assert main([*argv, "-c", str(config)]) == status
    assert capsys.readouterr().err.splitlines()[-1] == error


def test_an_unreadable_import_file_is_named_before_any_database_opens(tmp_path, capsys):
    Spool(tmp_path / "spool").ensure()
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n')
    missing = tmp_path / "missing.csv"
    assert main(["suppression", "import", str(missing), "-c", str(config)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"relay: cannot read {missing}: No such file or directory"]
    assert not list((tmp_path / "spool").glob("*.db*"))


def test_a_queue_command_without_a_spool_names_the_directory(tmp_path, capsys):
    path = tmp_path / "relay.toml"
    path.write_text(f'[spool]\ndir = "{tmp_path / "nowhere"}"\n')
    assert main(["queue", "list", "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"relay queue: no spool at {tmp_path / 'nowhere'} (spool.dir); has the relay run here?"]
