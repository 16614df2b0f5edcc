"""Invariants 1 and 2 at the level of system calls, as strace sees a real spool make them:
a message's file is synced before the rename that makes it visible, and that rename is
synced (its directory) before the call returns (before the 250); a new record is synced
before it replaces the old one; a removal is synced before delivery hears it is done.

Each case runs a small Python process under `strace -f -y` (skipped without strace).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

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


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("sync")
    out = tmp / "strace.txt"
    subprocess.run(["strace", "-f", "-y", "-s", "64", "-o", str(out),
                    "-e", "trace=openat,write,writev,fdatasync,fsync,rename,renameat,"
                          "renameat2,unlink,unlinkat,copy_file_range",
                    sys.executable, "-c", SCRIPT, str(tmp / "spool")],
                   check=True, timeout=60, capture_output=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return out.read_text().splitlines()


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
