"""Invariants 1 and 2 at the level of system calls, as strace sees a real spool make them:
a message's file is synced before the rename that makes it visible, and that rename is
synced (its directory) before the call returns (before the 250); a new record is synced
before it replaces the old one; a removal is synced before delivery hears it is done.

Each case runs a small Python process under `strace -f -y` (skipped without strace); the
last one with the spool on a tmpfs of its own (root only), where one syncfs does it all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_faults_spool import small_disk  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

SCRIPT = r'''
import os, sys, time
from relay.spool.record import Envelope, State
from relay.spool.spool import Spool
spool = Spool(sys.argv[1])
spool.ensure()
qid = spool.accept(Envelope("a@example.com", ("b@example.net",), time.time()), b"m\r\n",
                   qid="0000000000001AAAAA")
os.write(1, b"accepted\n")
record = spool.load(State.ACTIVE, qid)
record.attempts = 1
spool.save(State.ACTIVE, record)
os.write(1, b"saved\n")
spool.discard(State.ACTIVE, qid)
os.write(1, b"discarded\n")
'''
QID = "0000000000001AAAAA"


def traced(spool: Path, out: Path) -> list[str]:
    subprocess.run(["strace", "-f", "-y", "-s", "64", "-o", str(out),
                    "-e", "trace=openat,write,writev,fdatasync,fsync,syncfs,rename,renameat,"
                          "renameat2,unlink,unlinkat,copy_file_range",
                    sys.executable, "-c", SCRIPT, str(spool)],
                   check=True, timeout=60, capture_output=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return out.read_text().splitlines()


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("sync")
    return traced(tmp / "spool", tmp / "strace.txt")


def first(calls: list[str], pattern: str, after: int = -1) -> int:
    """The index of the first call matching pattern after index `after`."""
    rx = re.compile(pattern)
    for i in range(after + 1, len(calls)):
        if rx.search(calls[i]):
            return i
    raise AssertionError(f"no call matching {pattern!r} after line {after}")


def test_an_accepted_message_is_synced_then_renamed_then_its_rename_synced(calls):
    written = first(calls, rf"writev\(\d+</[^>]*/incoming/{QID}>")
    synced = first(calls, rf"fdatasync\(\d+</[^>]*/incoming/{QID}>\) = 0", written)
    renamed = first(calls, rf"rename\w*\(.*incoming/{QID}.*active/{QID}", synced)
    dir_synced = first(calls, r"fsync\(\d+</[^>]*/spool/active>\) = 0", renamed)
    acknowledged = first(calls, r'write\(1.*"accepted')
    assert written < synced < renamed < dir_synced < acknowledged


def test_a_new_record_is_synced_before_it_replaces_the_old_one(calls):
    start = first(calls, r'write\(1.*"accepted')
    tmp = first(calls, rf"openat\(.*incoming/\.save-{QID}", start)
    synced = first(calls, rf"fdatasync\(\d+</[^>]*/incoming/\.save-{QID}>\) = 0", tmp)
    replaced = first(calls, rf"rename\w*\(.*incoming/\.save-{QID}.*active/{QID}", synced)
    dir_synced = first(calls, r"fsync\(\d+</[^>]*/spool/active>\) = 0", replaced)
    assert dir_synced < first(calls, r'write\(1.*"saved')


def test_a_finished_message_is_one_unlink_synced_before_the_caller_goes_on(calls):
    start = first(calls, r'write\(1.*"saved')
    removed = first(calls, rf"unlink\w*\(.*active/{QID}", start)
    dir_synced = first(calls, r"fsync\(\d+</[^>]*/spool/active>\) = 0", removed)
    assert dir_synced < first(calls, r'write\(1.*"discarded')


def test_on_a_filesystem_of_its_own_one_syncfs_before_the_rename_and_one_after(
        tmp_path, small_disk):  # noqa: F811 - the fixture imported above
    calls = traced(small_disk, tmp_path / "strace.txt")
    written = first(calls, rf"writev\(\d+</[^>]*/incoming/{QID}>")
    synced = first(calls, r"syncfs\(\d+<[^>]*/small>\) = 0", written)
    renamed = first(calls, rf"rename\w*\(.*incoming/{QID}.*active/{QID}", synced)
    again = first(calls, r"syncfs\(\d+<[^>]*/small>\) = 0", renamed)
    assert again < first(calls, r'write\(1.*"accepted')
    assert not any("fdatasync" in c for c in calls[written:renamed])
