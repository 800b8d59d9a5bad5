"""Two training processes on one machine: each one's throughput alone and side by side, for classification and
detection, with the pipeline's thread choice (`train.threads=auto`) and with one thread per core in every process
(what torch does by default, `train.threads=<cores>`), optionally with OpenMP told to sleep instead of spin.

    python benchmarks/contention.py [--modes auto,cores] [--tasks classification,detection]

Each scenario is a real `pipeline run` (its own MLflow store and output folder); the img/s is the median of its
logged `train/throughput` over epochs. Paired runs start together with identical settings. Targets (issue 19): each
run of a pair keeps >= 0.45 of its solo img/s, and `auto` alone is no more than 5% slower than one thread per core.
Run it on an otherwise idle machine: it is about the machine's load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    # task file, overrides: short runs at each task file's own size and batch
    "classification": ("tasks/quickstart.yaml", ["model.backbone.weights=none"]),
    "detection": ("tasks/detection_shapes.yaml", ["model.backbone.weights=none"]),
}
MODES = {
    "auto": ({}, ["train.threads=auto"]),
    "cores": ({}, [f"train.threads={len(os.sched_getaffinity(0))}"]),
    "cores+passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [f"train.threads={len(os.sched_getaffinity(0))}"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="classification,detection")
    parser.add_argument("--modes", default="auto,cores")
    parser.add_argument("--epochs", default="classification=3,detection=2",
                        help="epochs per task, e.g. classification=3,detection=2")
    args = parser.parse_args()
    epochs = dict(kv.split("=") for kv in args.epochs.split(","))
    print(f"{C.cpu_model()}; {len(os.sched_getaffinity(0))} CPUs in this process's affinity")
    print(f"{'task':<15}{'threads':<15}{'solo':>8}{'paired a':>10}{'paired b':>10}{'paired/solo':>13}"
          f"{'target':>8}{'threads a/b':>13}")
    solo_by_mode: dict[tuple[str, str], float] = {}
    for task in args.tasks.split(","):
        for mode in args.modes.split(","):
            env, overrides = MODES[mode]
            over = [*TASKS[task][1], *overrides, f"train.epochs={epochs.get(task, 2)}"]
            solo = run_together(TASKS[task][0], over, env, 1)[0]
            a, b = run_together(TASKS[task][0], over, env, 2)
            ratio = min(a["rate"], b["rate"]) / solo["rate"]
            solo_by_mode[(task, mode)] = solo["rate"]
            print(f"{task:<15}{mode:<15}{solo['rate']:>8.1f}{a['rate']:>10.1f}{b['rate']:>10.1f}{ratio:>13.2f}"
                  f"{'>=0.45':>8}{a['threads']:>7}/{b['threads']}", flush=True)
    for task in args.tasks.split(","):
        if (task, "auto") in solo_by_mode and (task, "cores") in solo_by_mode:
            r = solo_by_mode[(task, "auto")] / solo_by_mode[(task, "cores")]
            print(f"{task}: solo auto / solo one thread per core = {r:.3f} (target >= 0.95)")


def run_together(task_file: str, overrides: list[str], env: dict[str, str], n: int) -> list[dict]:
    """`n` identical runs started at once; each one's median train/throughput and the threads it logged."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base.update(env, TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory() as tmp:
        procs, stores = [], []
        for i in range(n):
            store = f"sqlite:///{tmp}/m{i}.db"
            cmd = [sys.executable, "-m", "pipeline", "run", task_file, *overrides, f"tracking.uri={store}",
                   f"train.output_dir={tmp}/out{i}", "tracking.log_model=false", "tracking.log_checkpoint=false",
                   "train.keep_checkpoints=best"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
            stores.append(store)
        started = time.perf_counter()
        outputs = [p.communicate()[0] for p in procs]
        for p, out in zip(procs, outputs):
            if p.returncode:
                raise SystemExit(f"{task_file} {' '.join(overrides)} failed:\n{out[-2000:]}")
        wall = time.perf_counter() - started
        return [_read(store) | {"wall": wall} for store in stores]


def _read(store: str) -> dict:
    client = MlflowClient(store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/throughput")]
    threads = sorted({int(m.value) for m in client.get_metric_history(run.info.run_id, "train/threads")})
    return {"rate": statistics.median(rates), "threads": ",".join(map(str, threads)) or run.data.params.get("threads")}


if __name__ == "__main__":
    main()
