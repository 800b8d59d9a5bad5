"""Is the loader or the model the bottleneck? Decode + augment img/s per task with 0, 1 and 2 workers, next to the
training step's consumption on the same batches.

    python benchmarks/data_loading.py [TASK_FILE ...] [--batches 10]

Default task files: every tasks/*shapes*.yaml plus the quickstart. The training column is engine.train_one_epoch on
batches already in memory (the model alone); a loader slower than it starves training unless workers are added.
"""
from __future__ import annotations

import argparse
import glob
import time

import _common as C

from pipeline.platform import devices
from pipeline.train import engine


def loader_rate(dataset, batch: int, workers: int, batches: int, task=None) -> float:
    loader = C.loader(dataset, batch, workers, task=task)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per batch
    images, start = 0, time.perf_counter()
    for _, b in zip(range(batches), it):
        images += devices.batch_len(b)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_files", nargs="*")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    files = args.task_files or ["tasks/quickstart.yaml", *sorted(glob.glob("tasks/*shapes*.yaml"))]
    print(f"{'task file':<32}{'size':>5}" + "".join(f"{f'{w} workers':>12}" for w in args.workers)
          + f"{'train step':>12}  bottleneck (img/s)")
    summary = []
    for path in files:
        cfg, task, train_ds, _, info = C.load_task(path)
        device = devices.resolve_device(cfg.train.device)
        s = engine.StepSettings(device=device, precision=devices.resolve_precision(cfg.train.precision, device),
                                channels_last=cfg.train.channels_last, log_every=10**9)
        batch = cfg.data.batch_size
        loads = {w: loader_rate(train_ds, batch, w, args.batches, task) for w in args.workers}
        model, optimizer = C.build_model(cfg, task, info, None, device, cfg.train.channels_last)
        train = C.pipeline_rate(model, task.loss, optimizer, C.first_batches(train_ds, batch, 3, task), 6, s)
        verdict = "model" if loads[args.workers[0]] > train else "loader"
        print(f"{path:<32}{cfg.data.image_size:>5}" + "".join(f"{loads[w]:>12.0f}" for w in args.workers)
              + f"{train:>12.0f}  {verdict}")
        summary.append(f"{path.split('/')[-1]}: loader(0 workers)/train {loads[args.workers[0]] / train:.1f}x")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":
    main()
