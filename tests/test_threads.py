"""Thread choice from what a process may use (affinity, cgroup quota) and what other processes keep busy: made-up
/proc/stat and cgroup files through the functions that read them, and real busy processes beside a governor."""
import multiprocessing
import os
import signal
import subprocess
import sys
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


def test_cgroup_v1_takes_the_tightest_quota_up_the_path_and_ignores_unreadable_levels(tmp_path: Path):
    # cgroup v1 with cpu and cpuacct mounted apart (as on this machine), nested groups, one level with no files
    write(tmp_path / "self", "9:name=systemd:/\n2:cpuacct:/ci/job/step\n1:cpu:/ci/job/step\n0::/\n")
    fs = tmp_path / "fs" / "cpu"
    write(fs / "cpu.cfs_quota_us", "-1\n")
    write(fs / "cpu.cfs_period_us", "100000\n")
    write(fs / "ci/cpu.cfs_quota_us", "150000\n")
    write(fs / "ci/cpu.cfs_period_us", "100000\n")
    write(fs / "ci/job/step/cpu.cfs_quota_us", "400000\n")
    write(fs / "ci/job/step/cpu.cfs_period_us", "100000\n")
    (fs / "ci/job").mkdir(exist_ok=True)  # a level without quota files: skipped, not an error
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 1.5
    write(fs / "ci/cpu.cfs_quota_us", "garbage\n")  # unreadable: as if unset
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 4.0


def test_cgroup_v2_max_everywhere_is_no_quota_and_a_hybrid_takes_the_tightest(tmp_path: Path):
    write(tmp_path / "self", "0::/user.slice/session\n")
    write(tmp_path / "fs/cpu.max", "max 100000\n")
    write(tmp_path / "fs/user.slice/cpu.max", "max 100000\n")
    write(tmp_path / "fs/user.slice/session/cpu.max", "max\n")  # malformed: no period
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") is None
    # a v1 cpu controller line and the unified line in one file: both read, the tighter wins
    write(tmp_path / "self", "3:cpu,cpuacct:/box\n0::/user.slice/session\n")
    write(tmp_path / "fs/cpu,cpuacct/box/cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "fs/cpu,cpuacct/box/cpu.cfs_period_us", "100000\n")
    write(tmp_path / "fs/user.slice/cpu.max", "50000 100000\n")
    assert threads.cgroup_quota(tmp_path / "fs", tmp_path / "self") == 0.5
    assert threads.allowed_cpus({0, 1, 2, 3}, 0.5) == 0.5 and threads.allowed_cpus({0, 1, 2, 3}, 2.5) == 2.5
    assert threads.allowed_cpus({0, 1}, None) == 2.0


STAT = """cpu  {total}
cpu0 {cpu0}
cpu1 {cpu1}
cpu2 100 0 20 200 10 0 0 0 0 0
intr 1 2 3
ctxt 99
btime 1700000000
"""


def _stat(path: Path, cpu0: str, cpu1: str) -> Path:
    path.write_text(STAT.format(total="0 0 0 0 0 0 0 0 0 0", cpu0=cpu0, cpu1=cpu1))
    return path


def test_proc_stat_counts_busy_ticks_of_the_allowed_cpus_only(tmp_path: Path):
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice: idle and iowait are not busy; guest time is
    # already inside user time and must not count twice
    stat = _stat(tmp_path / "stat", "100 0 50 400 20 0 0 0 0 0", "200 0 30 300 20 5 5 10 70 0")
    assert threads._busy_seconds({0, 1}, stat) == pytest.approx((150 + 250) / tick)
    assert threads._busy_seconds({1}, stat) == pytest.approx(250 / tick)  # taskset -c 1: cpu0 and cpu2 are not ours
    assert threads._busy_seconds({0, 1}, tmp_path / "missing") is None


def test_two_proc_stat_snapshots_give_the_cpus_other_processes_kept_busy(tmp_path: Path):
    tick = os.sysconf("SC_CLK_TCK")
    before = _stat(tmp_path / "before", "100 0 50 400 20 0 0 0 0 0", "200 0 30 300 20 0 0 0 0 0")
    # two seconds later: cpu0 busy all the time (2 s), cpu1 busy for 1.5 s, of which this process used 0.5 s
    after = _stat(tmp_path / "after", f"{100 + 2 * tick} 0 50 400 20 0 0 0 0 0",
                  f"{200 + tick} 0 {30 + tick // 2} {300 + tick // 2} 20 0 0 0 0 0")
    first = Sample(10.0, threads._busy_seconds({0, 1}, before), own=3.0)
    second = Sample(12.0, threads._busy_seconds({0, 1}, after), own=3.5)
    others = threads.others_busy(first, second)
    assert others == pytest.approx((2.0 + 1.5 - 0.5) / 2.0)
    assert threads.threads_for(threads.allowed_cpus({0, 1}, None), others) == 1
    assert threads.others_busy(first, Sample(10.01, second.busy, second.own)) == 0.0  # too short to tell


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


_BURN = """
import os, subprocess, sys
# the burner is this helper's child, not the test process's: the governor counts its own children as its own work
burner = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {%d})\\nwhile True: pass"])
burner.wait()
"""


def _start_burner(cpu: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BURN % cpu], start_new_session=True)


def _stop_burner(helper: subprocess.Popen) -> None:
    os.killpg(helper.pid, signal.SIGKILL)  # the helper and its burner: one process group of their own
    helper.wait(timeout=10)


def _poll_until(governor: Governor, wanted: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if governor.poll() == wanted:
            return True
    return False


@pytest.mark.slow
def test_a_real_busy_process_takes_a_thread_and_its_end_gives_it_back():
    """Two CPUs, a governor on them, and a real process burning one of them: the governor gives up a thread while it
    runs and takes it back when it ends. Nothing faked: /proc/stat, this process's own times, real processes."""
    cpus = set(sorted(threads.affinity())[:2])
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    quiet = threads.sample(cpus)
    time.sleep(1.0)
    busy = threads.others_busy(quiet, threads.sample(cpus))
    if busy > threads.MARGIN:
        pytest.skip(f"other processes keep {busy:.1f} of the two CPUs busy: the governor would rightly take 1")
    governor = Governor("auto", env={}, cpus=cpus, quota=None, probe=1.0, every=1.0)
    assert governor.threads == 2, governor.why
    helper = _start_burner(min(cpus))
    try:
        assert _poll_until(governor, 1, seconds=20), f"kept {governor.threads} threads beside a busy process"
        assert torch.get_num_threads() == 1
    finally:
        _stop_burner(helper)
    assert _poll_until(governor, 2, seconds=20), "did not take the thread back when the busy process ended"
    assert torch.get_num_threads() == 2
    assert [n for _, n in governor.changes][:1] == [1] and governor.changes[-1][1] == 2


def test_config_field(task_file):
    from pipeline import config

    assert config.load(task_file(), ("train.threads=4",)).train.threads == 4
    assert config.load(task_file(), ()).train.threads == "auto"
    with pytest.raises(Exception, match="threads"):
        config.load(task_file(), ("train.threads=0",))
