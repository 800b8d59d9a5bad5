"""Start a sweep child's `pipeline run` as a process of its own, without paying for its imports each time.

A fresh `python -m pipeline run` spends about 5 s of one core importing torch, timm and MLflow before it reads its task
file: on the quickstart's 2-epoch children that is a quarter of each child, and a parallel sweep of small children on
two cores then takes as long as a sequential one, which imports once. So children are forked from a server process
(multiprocessing's forkserver) that has imported the pipeline once and has done nothing else: no CUDA, no OpenMP
threads, no tracking store open, so a fork of it is as clean as a new interpreter. Each child then takes the
environment, working folder, CPU affinity and console it would have had as a new process, starts a session of its own
(Ctrl-C reaches it through its process group), runs `pipeline run` with its arguments and exits with its exit code.
The server starts as soon as a sweep knows it will run children in parallel, so its imports overlap the sweep's own
start. A command that is not `python -m pipeline ...` (torchrun, for a child on several GPUs) runs as a plain process.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
from multiprocessing import forkserver
from pathlib import Path

CONSOLE = "console.log"  # a child's console, in its output folder
PRELOAD = ["pipeline.cli", "pipeline.train.runner"]  # what every child imports first; importing is most of its start


def warm() -> None:
    """Start the fork server now (it imports PRELOAD in the background) if this platform has one."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        multiprocessing.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()


class Forked:
    """A child forked from the server, with the part of subprocess.Popen's interface the sweeps use."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode


def start(cmd: list[str], console: Path, env: dict[str, str], cores: tuple[int, ...] = (),
          cwd: str | None = None) -> Forked | subprocess.Popen:
    """Run `cmd` with its output appended to `console`, in `env` and `cwd`, on `cores` (all when empty)."""
    if cmd[1:3] == ["-m", "pipeline"] and "forkserver" in multiprocessing.get_all_start_methods():
        warm()
        process = multiprocessing.get_context("forkserver").Process(
            target=_child, args=(cmd[3:], str(console), env, cores, cwd), name="pipeline-child")
        process.start()
        return Forked(process)
    log = console.open("a")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    finally:
        log.close()  # the process holds its own copy


def run_on_worker(cmd: list[str], output_dir: str, cwd: str, threads: int) -> int:
    """The body of a sweep child's Ray task (pipeline/study/on_ray.py), on the worker: its command, its console in its
    folder, as many threads as the CPUs Ray gave it; its exit code. It lives here because this module imports nothing
    heavy: a worker that unpickles it would otherwise import torch before its fork server does the same."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return start(cmd, folder / CONSOLE, env, cwd=cwd if Path(cwd).is_dir() else None).wait()


def _child(args: list[str], console: str, env: dict[str, str], cores: tuple[int, ...], cwd: str | None) -> None:
    """In the forked child: become the process `python -m pipeline ARGS` would have been, then run it."""
    os.setsid()
    if cores:
        os.sched_setaffinity(0, cores)
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    out = os.open(console, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for target, source in ((0, null), (1, out), (2, out)):
        os.dup2(source, target)
    os.close(out)
    os.close(null)
    sys.argv = ["pipeline", *args]
    code = 0
    try:
        runpy.run_module("pipeline", run_name="__main__", alter_sys=True)  # what `python -m pipeline ARGS` runs
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        # a forked child leaves through os._exit, which skips atexit: run what an interpreter's exit would have
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)
