"""Thread choice from what a process may use (affinity, cgroup quota) and what other processes keep busy."""
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from pipeline.platform import threads
from pipeline.platform.threads import Governor, Sample


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path: Path):
    write(tmp_path / "self", "0::/jobs/train\n")
    write(tmp_path / "fs/cpu.max", "max 100000\n")
    write(tmp_path / "fs/jobs/cpu.max", "300000 100000\n")
    write(tmp_path / "fs/jobs/train/cpu.max", "150000 100000\n")
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 1.5
    write(tmp_path / "fs/jobs/train/cpu.max", "max 100000\n")
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 3.0


def test_cgroup_v1_quota_and_none(tmp_path: Path):
    write(tmp_path / "self", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 2.0
    write(tmp_path / "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")  # no quota
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") is None
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "missing") is None


@pytest.mark.parametrize("allowed, others, expected", [
    (2, 0.0, 2), (2, 0.2, 2), (2, 1.0, 1), (2, 0.5, 1), (2, 3.0, 1),
    (8, 0.0, 8), (8, 3.0, 5), (1.5, 0.0, 1), (16, 0.1, 16),
])
def test_threads_for(allowed, others, expected):
    assert threads.threads_for(allowed, others) == expected


def fake_samples(monkeypatch, busy_per_second: list[float], own_per_second: float = 0.0):
    """`threads.sample` returning one second apart each call, with other processes keeping `busy_per_second[i]` CPUs
    busy in the i-th second."""
    state = {"t": 0.0, "busy": 0.0, "own": 0.0, "i": 0}

    def sample(cpus):
        if state["i"]:
            others = busy_per_second[min(state["i"] - 1, len(busy_per_second) - 1)]
            state["busy"] += others + own_per_second
            state["own"] += own_per_second
            state["t"] += 1.0
        state["i"] += 1
        return Sample(state["t"], state["busy"], state["own"])

    monkeypatch.setattr(threads, "sample", sample)


def test_affinity_and_quota_cap_the_choice(monkeypatch):
    fake_samples(monkeypatch, [0.0])
    assert Governor("auto", env={}, cpus={0, 1, 2, 3}, quota=None, probe=0).threads == 4
    assert Governor("auto", env={}, cpus={3}, quota=None, probe=0).threads == 1  # taskset -c 3
    assert Governor("auto", env={}, cpus={0, 1, 2, 3}, quota=2.0, probe=0).threads == 2  # docker --cpus 2
    assert torch.get_num_threads() == 2


def test_busy_cpus_are_left_to_their_processes_and_taken_back(monkeypatch):
    # another job keeps one of two CPUs busy at the start, then ends
    fake_samples(monkeypatch, [1.0, 1.0, 0.0], own_per_second=1.0)
    governor = Governor("auto", env={}, cpus={0, 1}, quota=None, probe=0, every=0)
    assert governor.threads == 1 and torch.get_num_threads() == 1 and "1.0 busy" in governor.why
    assert governor.poll() == 1  # still there
    assert governor.poll() == 2 and torch.get_num_threads() == 2  # gone: both CPUs again
    assert [n for _, n in governor.changes] == [2]


def test_setting_and_environment_override_auto(monkeypatch):
    fake_samples(monkeypatch, [2.0])  # would give 1 thread
    governor = Governor(3, env={"OMP_NUM_THREADS": "1"}, cpus={0, 1}, quota=1.0)
    assert governor.threads == 3 and torch.get_num_threads() == 3 and governor.why == "train.threads=3"
    assert governor.poll() == 3
    governor = Governor("auto", env={"OMP_NUM_THREADS": "2"}, cpus={0, 1, 2, 3}, quota=None)
    assert governor.threads == 2 and governor.why == "OMP_NUM_THREADS=2"


def test_the_real_machine_gives_a_sane_choice():
    governor = Governor("auto", env={}, probe=0.05)
    assert 1 <= governor.threads <= len(threads.affinity())
    others = threads.others_busy(threads.sample(governor.cpus), threads.sample(governor.cpus))
    assert others >= 0.0


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_finished_loader_worker_is_not_counted_as_another_process():
    """A worker that burned CPU and exited (a non-persistent DataLoader's, at the end of its pass) is this process's
    own work: counting it as another process's would take a thread away for nothing."""
    cpus = threads.affinity()
    before = threads.sample(cpus)
    worker = multiprocessing.get_context("fork").Process(target=_burn, args=(0.6,))
    worker.start()
    worker.join()
    after = threads.sample(cpus)
    assert worker.exitcode == 0
    # the worker's 0.6 CPU-seconds are this process's own, not other processes' (which the busy CPUs would say)
    assert after.own - before.own >= 0.5


def test_config_field(task_file):
    from pipeline import config

    assert config.load(task_file(), ("train.threads=4",)).train.threads == 4
    assert config.load(task_file(), ()).train.threads == "auto"
    with pytest.raises(Exception, match="threads"):
        config.load(task_file(), ("train.threads=0",))
