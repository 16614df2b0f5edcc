"""The queue verbs as an operator uses them, run in process against a real spool: --all
with --yes, ids on standard input, -c anywhere, durations with units, hints, the
PEND/RCPT column, commands refusing a spool or database that does not exist, and --help."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

from relay import config as config_mod
from relay.ops.cli import build_parser, main, subcommands
from relay.ops.feedback_cli import missing_store
from relay.ops.queue_cli import cli_duration, read_ids
from relay.spool.queue import wrong_state
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
from relay.store.db import Database


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", fsync=False)
    s.ensure()
    return s


@pytest.fixture
def config(tmp_path: Path, spool: Spool) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[spool]\ndir = "{spool.root}"\n')
    return path


def put(spool: Spool, state: State, rcpts: tuple[str, ...] = ("b@y.example",)) -> str:
    qid = spool.accept(Envelope("a@x.example", rcpts, time.time()), b"Subject: t\r\n\r\nm\r\n")
    if state is not State.ACTIVE:
        spool.move(qid, State.ACTIVE, state)
    return qid


def one_each(spool: Spool) -> dict[State, str]:
    return {state: put(spool, state) for state in (State.ACTIVE, State.DEFERRED, State.HOLD,
                                                   State.FAILED)}


def where(spool: Spool) -> dict[str, list[str]]:
    return {s.value: sorted(spool.scan(s)) for s in
            (State.ACTIVE, State.DEFERRED, State.HOLD, State.FAILED)}


@pytest.mark.parametrize("verb, extra, moved_to", [
    ("hold", [], {"active": "hold", "deferred": "hold"}),
    ("retry", [], {"deferred": "active"}),
    ("release", [], {"hold": "active"}),
    ("requeue", [], {"deferred": "active", "hold": "active", "failed": "active"}),
    ("requeue", ["--state", "failed"], {"failed": "active"}),
    ("delete", [], {"active": None, "deferred": None, "hold": None, "failed": None}),
    ("delete", ["--state", "failed"], {"failed": None}),
])
def test_all_with_yes_acts_on_the_verbs_states(spool, config, capsys, verb, extra, moved_to):
    ids = one_each(spool)
    assert main(["queue", verb, "--all", "--yes", *extra, "-c", str(config)]) == 0
    expected: dict[str, list[str]] = {s.value: [] for s in ids}
    for state, qid in ids.items():
        dst = moved_to.get(state.value, state.value)
        if dst is not None:
            expected[dst].append(qid)
    assert where(spool) == {k: sorted(v) for k, v in expected.items()}


@pytest.mark.parametrize("verb", ["hold", "retry", "release", "requeue", "delete"])
def test_all_without_yes_from_a_pipe_changes_nothing(spool, config, capsys, verb):
    one_each(spool)
    before = where(spool)
    assert main(["queue", verb, "--all", "-c", str(config)]) == 1
    assert "refusing without --yes (standard input is not a terminal)" in capsys.readouterr().err
    assert where(spool) == before


def test_ids_on_standard_input(spool, config, capsys, monkeypatch):
    a, b, c = (put(spool, State.ACTIVE) for _ in range(3))
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{a}\n\n{b}\n"))
    assert main(["queue", "hold", "-", "-c", str(config)]) == 0
    assert where(spool)["hold"] == sorted([a, b]) and where(spool)["active"] == [c]


def test_list_output_piped_into_delete(spool, config, capsys, monkeypatch):
    keep = put(spool, State.ACTIVE)
    gone = [put(spool, State.FAILED) for _ in range(2)]
    assert main(["queue", "list", "--state", "failed", "-c", str(config)]) == 0
    table = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(table))
    assert main(["queue", "delete", "-", "-c", str(config)]) == 1  # ids on stdin: no answer
    assert "refusing without --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(table))
    assert main(["queue", "delete", "-", "--yes", "-c", str(config)]) == 0
    assert where(spool)["failed"] == [] and where(spool)["active"] == [keep]
    assert len(gone) == 2


@pytest.mark.parametrize("lines, ids", [
    (["A1\n", "B2 \n", "\n", "  C3\n"], ["A1", "B2"]),
    (["ID   STATE\n", "X9 failed 1s\n", "     last error\n", "-- 1 message(s)\n"], ["X9"]),
    ([], []),
])
def test_read_ids(lines, ids):
    assert read_ids(lines) == ids


@pytest.mark.parametrize("argv", [
    ["queue", "-c", "{c}", "list"],
    ["-c", "{c}", "queue", "list"],
    ["queue", "list", "-c", "{c}"],
    ["queue", "--config", "{c}", "list", "--state", "hold"],
])
def test_config_anywhere_on_the_command_line(spool, config, capsys, argv):
    qid = put(spool, State.HOLD)
    assert main([a.format(c=config) for a in argv]) == 0
    assert qid in capsys.readouterr().out


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0), ("250ms", 0.25),
    ("1.5h", 5400.0), ("2", None), ("2.5", None), ("soon", None), ("-1h", None), ("", None),
])
def test_cli_duration_needs_a_unit(text, seconds):
    if seconds is None:
        with pytest.raises(config_mod.ConfigError) as err:
            cli_duration("--older-than", text)
        assert str(err.value).startswith("--older-than: must be a number with a unit")
    else:
        assert cli_duration("--older-than", text) == seconds


def test_older_than_without_a_unit_is_refused(config, capsys):
    assert main(["queue", "list", "--older-than", "2", "-c", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "relay queue: --older-than: must be a number with a unit (ms, s, m, h or d), such "
        "as 30s, 5m, 2h or 1d; got '2'"]


@pytest.mark.parametrize("verb, state, says", [
    ("retry", State.HOLD, "Q: is held: release it to send it now (relay queue release Q)"),
    ("retry", State.FAILED, "Q: has failed for good: requeue it to try again "
                            "(relay queue requeue Q)"),
    ("release", State.DEFERRED, "Q: is not held: it is deferred; retry sends it now "
                                "(relay queue retry Q)"),
    ("hold", State.CORRUPT, "Q: is corrupt (unreadable or not a message): read it with "
                            "relay queue show Q, then delete it"),
    ("requeue", State.INCOMING, "Q: is incoming; requeue applies to deferred, hold"),
])
def test_wrong_state_says_what_to_do(verb, state, says):
    assert wrong_state("Q", verb, state, (State.DEFERRED, State.HOLD)) == says


def test_retry_of_a_held_message_says_to_release_it(spool, config, capsys):
    qid = put(spool, State.HOLD)
    assert main(["queue", "retry", qid, "-c", str(config)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"relay queue retry: {qid}: is held: release it to send it now "
        f"(relay queue release {qid})")
    assert where(spool)["hold"] == [qid]


def test_rcpt_column_is_pending_of_total(spool, config, capsys):
    qid = put(spool, State.DEFERRED, ("a@y.example", "b@y.example", "c@y.example"))
    rec = spool.load(State.DEFERRED, qid)
    rec.results["a@y.example"] = {"status": "sent", "at": time.time(), "ses_message_id": "m"}
    spool.save(State.DEFERRED, rec)
    assert main(["queue", "list", "-c", str(config)]) == 0
    head, row = capsys.readouterr().out.splitlines()[:2]
    col = head.index("PEND/RCPT")
    assert row[col:col + 9].strip() == "2/3"


def test_missing_store_table(tmp_path):
    spool = tmp_path / "spool"
    assert missing_store("", spool) == (
        f"no spool at {spool} (spool.dir); has the relay run here?")
    spool.mkdir()
    assert missing_store("", spool) == (f"no database at {spool / 'relay.db'} (database.url "
                                        "unset: relay.db in spool.dir); has the relay run here?")
    (spool / "relay.db").write_bytes(b"")
    assert missing_store("", spool) == ""
    other = tmp_path / "other.db"
    assert missing_store(f"sqlite:///{other}", spool) == (
        f"no database at {other} (database.url); has the relay run here?")
    assert missing_store("postgresql://relay@127.0.0.1/relay", tmp_path / "none") == ""


@pytest.mark.parametrize("argv", [
    ["log", "a@example.com"], ["suppression", "list"], ["suppression", "add", "a@example.com"],
    ["resume"],
])
def test_database_commands_never_create_a_spool_or_database(tmp_path, capsys, argv):
    nowhere = tmp_path / "nowhere"
    path = tmp_path / "relay.toml"
    path.write_text(f'[spool]\ndir = "{nowhere}"\n')
    assert main([*argv, "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"relay: no spool at {nowhere} (spool.dir); has the relay run here?"]
    assert not nowhere.exists()
    nowhere.mkdir()
    assert main([*argv, "-c", str(path)]) == 1
    assert "no database at" in capsys.readouterr().err
    assert list(nowhere.iterdir()) == []


def test_database_commands_work_once_the_database_exists(spool, config, capsys):
    async def create() -> None:
        await (await Database.open("", spool.root)).close()

    asyncio.run(create())
    assert main(["suppression", "add", "a@example.com", "-c", str(config)]) == 0
    assert main(["suppression", "list", "-c", str(config)]) == 0
    assert capsys.readouterr().out.startswith("added: a@example.com\na@example.com\t")


def test_every_subcommand_says_what_it_does_and_which_config_it_reads():
    parsers = subcommands(build_parser())
    names = {p.prog for p in parsers}
    assert {"relay serve", "relay check", "relay queue hold", "relay suppression list",
            "relay log", "relay sendmail", "relay sandbox", "relay passwd"} <= names
    for parser in parsers:
        text = " ".join(parser.format_help().split())
        doing, _, reading = (parser.description or "").partition("\n\n")
        assert len(doing) > 20, parser.prog
        assert "else $RELAY_CONFIG, else conf/relay.toml if present, else the built-in " \
               "defaults" in text, parser.prog
        assert reading.startswith("Reads the configuration"), parser.prog
