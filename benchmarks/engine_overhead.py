"""The pipeline's training step against a bare PyTorch loop: same model, size, batch, precision and memory format.

    python benchmarks/engine_overhead.py [tasks/quickstart.yaml] [--steps 20] [--rounds 3]

Rows, measured in turns: a bare loop on fixed tensors with plain PyTorch convolutions (what one writes by hand), the
same loop with the pipeline's convolutions (on CPU, small_conv's weight gradients), engine.train_one_epoch on those
tensors (the cost of the engine: non-finite check, schedule, per-stage lr, logging), and engine.train_one_epoch on
the task's real loader (decode and augmentation in the loop, as `pipeline run` trains, with its worker count).
Targets: engine >= 0.95 of the bare loop on the same model, and >= 0.85 of the plain bare loop with its data loading.
"""
from __future__ import annotations

import argparse

import _common as C

from pipeline.data import loading
from pipeline.platform import devices, small_conv
from pipeline.train import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_file", nargs="?", default="tasks/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg, task, train_ds, _, info = C.load_task(args.task_file, tuple(args.overrides))
    device = devices.resolve_device(cfg.train.device)
    precision = devices.resolve_precision(cfg.train.precision, device)
    s = engine.StepSettings(device=device, precision=precision, channels_last=cfg.train.channels_last,
                            log_every=cfg.train.log_every)
    model, optimizer = C.build_model(cfg, task, info, None, device, cfg.train.channels_last)
    batch = cfg.data.batch_size
    tensors = C.first_batches(train_ds, batch, 4, task)
    workers = loading.auto_workers(device) if cfg.data.num_workers == "auto" else cfg.data.num_workers
    real = C.loader(train_ds, batch, workers, task=task)
    def plain_bare() -> float:
        small_conv.restore(model)
        try:
            return C.bare_rate(model, task.loss, optimizer, tensors, args.steps, s)
        finally:
            if device.type == "cpu":
                small_conv.convert(model)

    rates = C.alternate({
        "bare loop, plain convs": plain_bare,
        "bare loop": lambda: C.bare_rate(model, task.loss, optimizer, tensors, args.steps, s),
        "engine": lambda: C.pipeline_rate(model, task.loss, optimizer, tensors, args.steps, s),
        f"engine + loader ({workers} workers)": lambda: C.pipeline_rate(model, task.loss, optimizer, real,
                                                                         args.steps, s),
    }, args.rounds)
    print(f"{args.task_file}: {cfg.model.backbone.name}, {cfg.data.image_size} px, batch {batch}, "
          f"{C.device_line(device, precision)}{' + channels_last' if cfg.train.channels_last else ''}")
    plain, bare = rates["bare loop, plain convs"], rates["bare loop"]
    print(f"{'':<34}{'img/s':>9}{'x plain':>9}{'x bare':>8}")
    for name, rate in rates.items():
        print(f"{name:<34}{rate:>9.1f}{rate / plain:>9.2f}{rate / bare:>8.2f}")
    engine_only, with_data = list(rates.values())[2:]
    print(f"summary: engine {engine_only / bare:.2f}x the bare loop on the same model (target >= 0.95); with its data "
          f"loading {with_data / plain:.2f}x a plain bare loop (target >= 0.85)")


if __name__ == "__main__":
    main()
