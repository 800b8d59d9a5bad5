"""`pipeline sweep --jobs N`: a sweep's children as processes of their own, N at a time, each on a device of its own.

With GPUs, child i gets GPU slot i round robin over the visible GPUs (`CUDA_VISIBLE_DEVICES`; `sweep.gpus_per_child`
GPUs a slot, under torchrun; more jobs than slots share them). On CPU, the cores this process may use are split into N
disjoint sets: a child runs on its own set (its affinity) with as many intra-op threads, so N children on C cores never
oversubscribe them (two 2-thread processes on 2 cores each run 5-30x slower, PITFALLS.md). A child that fails is said
and kept; the others go on. Ctrl-C stops every child (each marks its run KILLED) and then the sweep.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.study import launch
from pipeline.study.children import CONSOLE, Child, Spec, command

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between looks at the running children


@dataclass(frozen=True)
class Slot:
    """Where one child runs: GPUs (their ids as CUDA_VISIBLE_DEVICES gives them) or CPU cores."""

    gpus: tuple[str, ...] = ()
    cores: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}
        return {"OMP_NUM_THREADS": str(len(self.cores))}  # the thread governor takes it as given

    def __str__(self) -> str:
        if self.gpus:
            return f"GPU {','.join(self.gpus)}"
        return f"core{'s' * (len(self.cores) > 1)} {_ranges(self.cores)}"


def slots(jobs: int, gpus_per_child: int = 1, visible_gpus: list[str] | None = None,
          cores: list[int] | None = None) -> list[Slot]:
    """`jobs` places to run children: GPU slots of `gpus_per_child` GPUs where there are GPUs (shared round robin
    when jobs outnumber them), else `jobs` disjoint sets of the cores this process may use (as even as can be)."""
    visible = visible_gpus if visible_gpus is not None else _visible_gpus()
    if visible:
        groups = [tuple(visible[i:i + gpus_per_child]) for i in range(0, len(visible), gpus_per_child)]
        groups = [g for g in groups if len(g) == gpus_per_child]
        if not groups:
            raise UserError(f"sweep.gpus_per_child={gpus_per_child}: only {len(visible)} GPUs are visible")
        return [Slot(gpus=groups[i % len(groups)]) for i in range(jobs)]
    if gpus_per_child > 1:
        raise UserError(f"sweep.gpus_per_child={gpus_per_child} needs GPUs, and none is visible; set it to 1")
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    jobs = min(jobs, len(cores))
    return [Slot(cores=tuple(cores[i * len(cores) // jobs:(i + 1) * len(cores) // jobs])) for i in range(jobs)]


def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def run_parallel(task_file: str | Path, children: list[Spec], places: list[Slot], parent_id: str, gpus_per_child: int,
                 collect: Callable[[Spec, int], Child]) -> list[Child]:
    """Run `children` as processes, one per free slot, in order; `collect(spec, returncode)` reads each one's result
    once it has ended. Returns the children's results in their order."""
    waiting = list(children)
    running: dict[int, tuple[Spec, launch.Forked | subprocess.Popen, float]] = {}  # slot -> child, process, start
    done: dict[int, Child] = {}
    try:
        while waiting or running:
            for index in [i for i in range(len(places)) if i not in running and waiting]:
                child = waiting.pop(0)
                running[index] = (child, *_start(task_file, child, places[index], parent_id, gpus_per_child))
            time.sleep(POLL)
            for index, (child, process, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[index]
                done[child.index] = result = collect(child, process.returncode)
                took = f"{time.monotonic() - started:.0f}s"
                log.info(f"{child.label}: {result.status} in {took}" +
                         (f", best {result.best:.4f}" if result.best is not None else "") +
                         (f": {result.error}" if result.error else ""))
    except KeyboardInterrupt:
        for child, process, _ in running.values():  # each child marks its own run KILLED on SIGINT
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        for child, process, _ in running.values():
            process.wait()
        raise
    return [done[c.index] for c in children]


def _start(task_file, child: Spec, slot: Slot, parent_id: str, gpus_per_child: int):
    child.output_dir.mkdir(parents=True, exist_ok=True)
    log.info(f"{child.label} -> {child.output_dir} on {slot}" + (" (continuing)" if child.resume else ""))
    process = launch.start(command(task_file, child, parent_id, gpus_per_child), child.output_dir / CONSOLE,
                           env={**os.environ, **slot.env()}, cores=slot.cores)
    return process, time.monotonic()


def _ranges(cores: tuple[int, ...]) -> str:
    """0,1,2,5 -> 0-2,5"""
    parts, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(parts)
