"""smtp.workers = "auto": usable cores from the affinity mask and the cgroup CPU quota."""

from __future__ import annotations

import os

import pytest

from relay import config
from relay.config_cores import MAX_WORKERS, quota_cores, usable_cores, workers
from relay.errors import ConfigError


@pytest.mark.parametrize(("line", "cores"), [
    ("max 100000", None),  # no quota
    ("200000 100000", 2),
    ("150000 100000", 2),  # 1.5 cores: a second worker still gets half a core
    ("50000 100000", 1),
    ("100000 100000\n", 1),
    ("", None),
    ("garbage", None),
    ("0 100000", None),
])
def test_a_cgroup_quota_reads_as_whole_cores(line, cores):
    assert quota_cores(line) == cores


def test_usable_cores_are_the_affinity_mask_lowered_by_the_quota(tmp_path):
    mask = len(os.sched_getaffinity(0))
    missing = tmp_path / "none"
    assert usable_cores(missing) == min(mask, MAX_WORKERS)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == min(mask, MAX_WORKERS)


def test_workers_default_to_the_usable_cores():
    assert workers(config.load(env={})) == usable_cores()
    assert workers(config.load(env={"RELAY_SMTP__WORKERS": "auto"})) == usable_cores()
    assert workers(config.load(env={"RELAY_SMTP__WORKERS": "3"})) == 3


def test_auto_with_the_embedded_sandbox_is_one_worker(tmp_path):
    # the sandbox lives in the relay's own process; an explicit count still refuses it
    loaded = config.load(env={"RELAY_SES__ENDPOINT_URL": "sandbox"})
    assert workers(loaded) == 1


def test_workers_from_a_file_take_auto_or_a_count(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nworkers = "auto"\n')
    assert workers(config.load(path, env={})) == usable_cores()
    path.write_text("[smtp]\nworkers = 2\n")
    assert workers(config.load(path, env={})) == 2


@pytest.mark.parametrize("value", ["0", "-1", "many", "65", "1.5"])
def test_a_bad_worker_count_names_the_key(value):
    with pytest.raises(ConfigError) as err:
        config.load(env={"RELAY_SMTP__WORKERS": value})
    assert "smtp.workers" in str(err.value)
    assert "auto" in str(err.value)
