"""`pipeline sweep --ray ADDRESS`: a sweep's children as Ray tasks, on this machine or across a cluster.

ADDRESS is `local` (a Ray instance on this machine, started and stopped by the sweep), `auto` (the cluster this machine
belongs to) or `ray://HOST:PORT` (Ray client). Each child is one task that asks for the resources its config names
(`sweep.resources`: by default one GPU where the cluster has GPUs, else the cores of one `--jobs` slot) and runs the
child's `pipeline run` as a process on its worker (pipeline/study/children.py), so it logs straight to the tracking
server; the sweep reads its result back from there. A child whose worker dies (a node lost, an out-of-memory kill) is
marked FAILED with the reason and started again while `sweep.retries` allows (it continues from its last.pt when one
is on a path the new worker reads); the other children go on. Ray is an optional extra: `pip install -e '.[ray]'`.

Workers on other machines must read the task file, the data and the output folders at the same paths as this machine
(a shared file system), and write to a tracking server they can reach: a local sqlite store is refused for them.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import UserError
from pipeline.study import launch
from pipeline.study.children import Child, Spec, command

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # seconds to reach a Ray cluster before giving up


def check(address: str, tracking_uri: str) -> None:
    """Refuse, before anything runs, what cannot work: no Ray installed, an address that is none of the three forms,
    an unreachable Ray client address, a local store for workers on other machines."""
    if not installed():
        raise UserError("--ray needs Ray, an optional extra: pip install -e '.[ray]' (or pip install 'ray>=2.40'); "
                        "--jobs N runs children in parallel on this machine without it")
    if address not in ("local", "auto") and not address.startswith("ray://"):
        raise UserError(f"--ray {address}: give local (a Ray instance on this machine), auto (this machine's cluster) "
                        "or ray://HOST:PORT")
    if address.startswith("ray://"):
        parsed = urllib.parse.urlparse(address)
        try:
            socket.create_connection((parsed.hostname, parsed.port or 10001), timeout=CONNECT_TIMEOUT).close()
        except (OSError, TypeError, ValueError) as err:
            raise UserError(f"--ray {address}: no Ray client server answers there ({err}); start the cluster's head "
                            "with `ray start --head` (client port 10001) or check the address") from None
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    if address != "local" and scheme in ("sqlite", "file", ""):
        raise UserError(f"--ray {address}: workers on other machines cannot write to the local store {tracking_uri}; "
                        "start a tracking server on a database (mlflow server --backend-store-uri "
                        "postgresql://USER@HOST/DB --artifacts-destination PATH_OR_BUCKET --host 0.0.0.0) and set "
                        "MLFLOW_TRACKING_URI=http://HOST:5000")


def installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def run_on_ray(address: str, task_file: str | Path, children: list[Spec], parent_id: str, resources: dict,
               retries: int, gpus_per_child: int, collect: Callable[[Spec, int, str], Child]) -> list[Child]:
    """Run `children` as Ray tasks; `collect(spec, returncode, reason)` reads each one's result once it has ended."""
    import ray
    from ray.exceptions import RayError

    _init(ray, address)
    try:
        ask = _resources(ray, resources, len(children), gpus_per_child)
        log.info(f"Ray at {address}: each child asks for {_describe(ask)}")
        remote = ray.remote(launch.run_on_worker).options(max_retries=retries, retry_exceptions=False, **ask)
        threads = max(1, math.floor(ask.get("num_cpus", 1)))
        pending = {remote.remote(command(task_file, child, parent_id, gpus_per_child), str(child.output_dir),
                                 os.getcwd(), threads): child for child in children}
        for child in children:
            log.info(f"{child.label} -> {child.output_dir} (queued)")
        done: dict[int, Child] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            child = pending.pop(ready[0])
            try:
                returncode, reason = ray.get(ready[0]), ""
            except RayError as err:  # the worker (or its node) died, after the retries sweep.retries allows
                returncode, reason = -1, f"its Ray worker died: {_first_line(err)}"
            done[child.index] = result = collect(child, returncode, reason)
            best = f", best {result.best:.4f}" if result.best is not None else ""
            log.info(f"{child.label}: {result.status}{best}" + (f": {result.error}" if result.error else ""))
        return [done[c.index] for c in children]
    finally:
        ray.shutdown()  # a local instance stops; a cluster stays, this driver leaves it


def _init(ray, address: str) -> None:
    started = time.monotonic()
    try:
        if address == "local":
            # on a small machine: no dashboard, the CPUs and memory this process may use, quiet workers
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"--ray {address}: cannot reach a Ray cluster ({_first_line(err)}) after "
                        f"{time.monotonic() - started:.0f}s; start one with `ray start --head`, or use --ray local "
                        "for this machine alone") from None


def _resources(ray, given: dict, children: int, gpus_per_child: int) -> dict:
    """What each child asks for: `sweep.resources` where set, else a GPU slot where the cluster has GPUs, else the
    cores of one --jobs slot (the cluster's CPUs shared by as many children as can run at once)."""
    cluster = ray.cluster_resources()
    if given.get("gpus") is not None or given.get("cpus") is not None:
        ask = {"num_gpus": given.get("gpus") or 0, "num_cpus": given.get("cpus") or 1}
    elif cluster.get("GPU", 0) >= 1:
        ask = {"num_gpus": gpus_per_child, "num_cpus": 1}
    else:
        cpus = int(cluster.get("CPU", 1))
        ask = {"num_gpus": 0, "num_cpus": max(1, cpus // max(1, min(children, cpus)))}
    return ask


def _describe(ask: dict) -> str:
    gpus = f"{ask['num_gpus']:g} GPU, " if ask.get("num_gpus") else ""
    return f"{gpus}{ask['num_cpus']:g} CPU"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]
