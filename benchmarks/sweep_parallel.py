"""A 4-child CPU sweep three ways, alternating in one run: children one after another (each on every core), two at a
time (`--jobs 2`: each on a core of its own), and as Ray tasks on a local Ray instance (`--ray local`).

    python benchmarks/sweep_parallel.py [--rounds 2] [--epochs 2]

The sweep is the quickstart's (64 px synthetic shapes, random init) over resnet18 and resnet34 and two learning
rates. Each timing is the whole `pipeline sweep` command, from a fresh store and output folder, the dataset made once
beforehand. Prints every round, the medians and the ratios --jobs 2 / sequential and --ray local / --jobs 2. Run it on
a quiet machine: other jobs beside it change all three.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model

SWEEP = ["model.backbone.name=resnet18,resnet34", "train.lr=0.002,0.004"]
WAYS = {"sequential": [], "--jobs 2": ["--jobs", "2"], "--ray local": ["--ray", "local"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    subprocess.run([sys.executable, "-m", "pipeline", "data", "synth", "--out", str(scratch / "shapes"), "--kind",
                    "classification"], check=True, capture_output=True)
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; 4 children (resnet18, resnet34 x lr 0.002, "
          f"0.004), {args.epochs} epochs each, quickstart at 64 px", flush=True)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_ in range(1, args.rounds + 1):
        for way, extra in WAYS.items():
            folder = scratch / f"{way.strip('-').replace(' ', '_')}-{round_}"
            folder.mkdir()
            cmd = [sys.executable, "-m", "pipeline", "sweep", "quickstart", *SWEEP, f"train.epochs={args.epochs}",
                   f"data.root={scratch / 'shapes' / 'classification'}", "model.backbone.weights=none",
                   "tracking.experiment=bench", *extra]
            started = time.perf_counter()
            done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
            took = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{way} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            times[way].append(took)
            print(f"round {round_}  {way:<12} {took:6.1f}s", flush=True)
    median = {way: statistics.median(values) for way, values in times.items()}
    print("\nmedian wall time of the whole sweep:")
    for way, value in median.items():
        print(f"  {way:<12} {value:6.1f}s")
    print(f"--jobs 2 / sequential:   {median['--jobs 2'] / median['sequential']:.2f}x (target <= 0.90)")
    print(f"--ray local / --jobs 2:  {median['--ray local'] / median['--jobs 2']:.2f}x (target <= 1.25)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
