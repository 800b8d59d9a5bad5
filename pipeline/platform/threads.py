"""How many intra-op threads a process should run: the CPUs it may use, less what other processes keep busy.

Two processes that each run one OpenMP thread per core on the same cores do not share them: every parallel region
waits for its slowest thread, a thread that is off its core stalls the whole region, and each process falls to a
fraction of half its speed (measured on 2 cores: two quickstart runs with 2 threads each took 5x as long, not 2x;
a 2-thread resnet18 step beside one busy single-thread job ran at 20-32 img/s, the single-thread job at 105).
OpenMP's spin-waiting is not the cause: `OMP_WAIT_POLICY=PASSIVE` left the pair as slow (benchmarks/contention.py).

So `train.threads: auto` takes
  - the CPUs this process may run on: its affinity mask, capped by the cgroup's CPU quota (`cpu.max` in cgroup v2,
    `cpu.cfs_quota_us / cpu.cfs_period_us` in v1), which containers set and `os.cpu_count()` does not see;
  - less the CPUs other processes keep busy, measured from /proc/stat over the allowed CPUs minus this process's own
    time and its children's (data loader workers);
and looks again every few seconds while training, so a run gives up a core when a second job starts beside it and
takes it back when that job ends. A number (`train.threads: 4`) or `OMP_NUM_THREADS` in the environment fixes the
count instead.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")
MARGIN = 0.3  # a core counts as taken once others keep it this busy: a 2-thread process beside it loses more
POLL_EVERY = 5.0  # seconds between looks at the other processes while training


# ---------------------------------------------------------------------------------------------------------------------
# What this process may use


def affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (1.5 for `150000 100000`), the tightest along the process's cgroup path; None
    without a quota."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            for folder in _up(root, path):
                limits.append(_v2_quota(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # v1
            base = next((root / name for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / name).is_dir()),
                        root / "cpu")
            for folder in _up(base, path):
                limits.append(_v1_quota(folder))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _up(base: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to the hierarchy's root."""
    parts = [p for p in path.strip().split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def allowed_cpus(cpus: set[int] | None = None, quota: float | None = None) -> float:
    """CPUs this process may keep busy: its affinity mask, capped by the cgroup quota."""
    n = len(cpus if cpus is not None else affinity())
    return min(float(n), quota) if quota is not None else float(n)


# ---------------------------------------------------------------------------------------------------------------------
# What the other processes keep busy


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    busy: float  # busy CPU-seconds of the allowed CPUs since boot, every process
    own: float  # CPU-seconds of this process and its children (loader workers) so far


def _busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(values) - values[3] - values[4]
    return busy / tick


def _own_seconds() -> float:
    """CPU time of this process (every thread), of its children that have exited (a non-persistent loader's workers,
    once joined) and of its live children (loader workers that have not)."""
    total = sum(os.times()[:4])  # user, system, and the same for the children it has waited for
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me = str(os.getpid())
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def sample(cpus: set[int]) -> Sample | None:
    busy = _busy_seconds(cpus)
    return None if busy is None else Sample(time.monotonic(), busy, _own_seconds())


def others_busy(before: Sample, after: Sample) -> float:
    """CPUs other processes kept busy between two samples (0.0 when the interval is too short to tell)."""
    span = after.at - before.at
    if span <= 0.05:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / span


def threads_for(allowed: float, others: float) -> int:
    """Intra-op threads for `allowed` CPUs of which others keep `others` busy: at least 1."""
    taken = max(0, math.ceil(others - MARGIN))  # 1.2 busy CPUs take one; 1.4 take two
    return max(1, math.floor(allowed) - taken)


# ---------------------------------------------------------------------------------------------------------------------
# The choice, kept up to date while training


class Governor:
    """Sets torch's intra-op threads now and, with `auto`, again whenever other processes take or free CPUs.

    `poll()` is called between training steps and costs nothing until `every` seconds have passed."""

    def __init__(self, setting: int | str = "auto", env: dict[str, str] | None = None, cpus: set[int] | None = None,
                 quota: float | None = None, probe: float = 0.2, every: float = POLL_EVERY) -> None:
        env = os.environ if env is None else env
        self.cpus = cpus if cpus is not None else affinity()
        self.allowed = allowed_cpus(self.cpus, quota if quota is not None else cgroup_quota())
        self.every = every
        self.changes: list[tuple[float, int]] = []  # (monotonic time, threads) after the first choice
        if setting != "auto":
            self.fixed, self.why = int(setting), f"train.threads={setting}"
        elif env.get("OMP_NUM_THREADS", "").strip().isdigit():
            self.fixed, self.why = int(env["OMP_NUM_THREADS"]), f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
        else:
            self.fixed, self.why = None, ""
        self._last = sample(self.cpus) if self.fixed is None else None
        if self.fixed is not None:
            self.threads = self.fixed
        else:
            time.sleep(probe)  # what the others do while this process is idle
            others = self._others()
            self.threads = threads_for(self.allowed, others)
            self.why = f"auto: {self.allowed:g} CPUs allowed, {others:.1f} busy with other processes"
        torch.set_num_threads(self.threads)

    def _others(self) -> float:
        now = sample(self.cpus)
        if now is None or self._last is None:
            return 0.0
        others, self._last = others_busy(self._last, now), now
        return others

    def summary(self) -> str:
        return f" with {self.threads} threads ({self.why})"

    def poll(self) -> int:
        """Threads after looking at the other processes again, when `every` seconds have passed since the last look."""
        if self.fixed is not None or self._last is None or time.monotonic() - self._last.at < self.every:
            return self.threads
        wanted = threads_for(self.allowed, self._others())
        if wanted != self.threads:
            self.threads = wanted
            torch.set_num_threads(wanted)
            self.changes.append((time.monotonic(), wanted))
        return self.threads
