"""Precision where users fine-tune: the pipeline's training img/s with `train.precision=auto` and `fp32` on the
quickstart data, next to bare loops (bf16 + channels_last, and fp32) on the same model, size and batch, in one run.

    python benchmarks/precision_224.py [--sizes 224 64] [--epochs 2] [--rounds 1]

The pipeline rows are real `pipeline run`s (images decoded and augmented in the loop, as users train; the img/s is the
last epoch's logged train/throughput). The bare loops are what a user would write by hand: timm's resnet18, fused
AdamW, cross-entropy, on batches already in memory (no loading at all), autocast bf16 + channels_last or plain fp32.
Targets (issue 19): pipeline auto >= 0.9 x bare bf16, and pipeline auto/fp32 >= 0.9 x bare bf16/fp32. What bf16 buys
depends on the CPU (AMX Xeons about 3x at 224 px, AVX512-BF16 EPYCs about 2x), so the CPU is printed first.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import _common as C  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pipeline_rate(size: int, precision: str, epochs: int, batch: int) -> float:
    """The last epoch's train/throughput of a real quickstart run at `size` px."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pipeline", "run", "tasks/quickstart.yaml", "model.backbone.weights=none",
               f"data.image_size={size}", f"data.batch_size={batch}", f"train.epochs={epochs}",
               f"train.precision={precision}", f"tracking.uri=sqlite:///{tmp}/m.db", f"train.output_dir={tmp}/out",
               "tracking.log_model=false", "tracking.log_checkpoint=false", "train.keep_checkpoints=best"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
        client = MlflowClient(f"sqlite:///{tmp}/m.db")
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        return client.get_metric_history(run.info.run_id, "train/throughput")[-1].value


def bare_rate(size: int, precision: str, batches: list, steps: int) -> float:
    """img/s of the hand-written loop on batches in memory."""
    torch.manual_seed(0)
    cl = precision == "bf16"
    model = timm.create_model("resnet18", num_classes=6)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model.train()

    def step(x, y):
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x, y in batches[:2]:  # warm-up: oneDNN picks its kernels for these shapes
        step(x, y)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
    return steps * len(batches[0][0]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="bare-loop steps per measurement")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"{C.cpu_model()}; {torch.get_num_threads()} threads")
    print(f"{'size':>5}{'pipe auto':>11}{'pipe fp32':>11}{'bare bf16':>11}{'bare fp32':>11}"
          f"{'auto/bare bf16':>16}{'pipe auto/fp32':>16}{'bare bf16/fp32':>16}{'ratio of ratios':>17}")
    for size in args.sizes:
        _, task, train_ds, _, _ = C.load_task("tasks/quickstart.yaml", (f"data.image_size={size}",
                                                                         "model.backbone.weights=none"))
        batches = [(x, y) for x, y in C.first_batches(train_ds, args.batch, 4, task)]
        rates = C.alternate({
            "pipe auto": lambda: pipeline_rate(size, "auto", args.epochs, args.batch),
            "bare bf16": lambda: bare_rate(size, "bf16", batches, args.steps),
            "pipe fp32": lambda: pipeline_rate(size, "fp32", args.epochs, args.batch),
            "bare fp32": lambda: bare_rate(size, "fp32", batches, args.steps),
        }, args.rounds, warmup=False)
        auto_vs_bare = rates["pipe auto"] / rates["bare bf16"]
        pipe_gain, bare_gain = rates["pipe auto"] / rates["pipe fp32"], rates["bare bf16"] / rates["bare fp32"]
        print(f"{size:>5}{rates['pipe auto']:>11.1f}{rates['pipe fp32']:>11.1f}{rates['bare bf16']:>11.1f}"
              f"{rates['bare fp32']:>11.1f}{auto_vs_bare:>16.2f}{pipe_gain:>16.2f}{bare_gain:>16.2f}"
              f"{pipe_gain / bare_gain:>17.2f}", flush=True)
    print("targets: auto/bare bf16 >= 0.90 and ratio of ratios (pipeline auto/fp32 over bare bf16/fp32) >= 0.90")


if __name__ == "__main__":
    main()
