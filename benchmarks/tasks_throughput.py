"""Per task and backbone depth: training img/s of the pipeline next to a bare loop on the same GPU or CPU, and
inference img/s, at each task file's own image size and batch.

    python benchmarks/tasks_throughput.py [TASK_FILE ...] [--backbones resnet18 resnet34 resnet50 resnet101]

Default task files: the quickstart and every tasks/*shapes*.yaml. Real batches from the task's synthetic data,
random-init backbones, the task file's fine-tuning plan and precision (auto: bf16 on AMX CPUs and bf16 GPUs).
"""
from __future__ import annotations

import argparse
import glob

import _common as C

from pipeline.platform import devices
from pipeline.train import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_files", nargs="*")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="Override the task files' batch size.")
    args = parser.parse_args()
    files = args.task_files or ["tasks/quickstart.yaml", *sorted(glob.glob("tasks/*shapes*.yaml"))]
    device = devices.resolve_device("auto")
    print(f"{C.device_line(device, devices.resolve_precision('auto', device))} (precision auto); img/s")
    print(f"{'task file':<30}{'backbone':<11}{'size':>5}{'batch':>6}{'train':>9}{'bare':>9}{'x bare':>8}{'infer':>9}")
    ratios: list[float] = []
    for path in files:
        try:
            ratios += measure_task(path, args)
        except Exception as err:  # one broken task file should not hide the others' numbers
            print(f"{path}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    print(f"summary: pipeline/bare training img/s from {min(ratios, default=0):.2f}x to {max(ratios, default=0):.2f}x "
          f"over {len(ratios)} task x backbone pairs")


def measure_task(path: str, args) -> list[float]:
    cfg, task, train_ds, val_ds, info = C.load_task(path)
    device = devices.resolve_device(cfg.train.device)
    s = engine.StepSettings(device=device, precision=devices.resolve_precision(cfg.train.precision, device),
                            channels_last=cfg.train.channels_last, log_every=cfg.train.log_every)
    batch = args.batch or cfg.data.batch_size
    train_batches = C.first_batches(train_ds, batch, 3, task)
    val_batches = C.first_batches(val_ds, batch, 3, task)
    ratios = []
    for name in args.backbones:
        model, optimizer = C.build_model(cfg, task, info, name, device, cfg.train.channels_last)
        rates = C.alternate({
            "train": lambda: C.pipeline_rate(model, task.loss, optimizer, train_batches, args.steps, s),
            "bare": lambda: C.bare_rate(model, task.loss, optimizer, train_batches, args.steps, s),
        }, args.rounds)
        infer = C.inference_rate(model, task.predict, val_batches, args.steps, s)
        ratios.append(rates["train"] / rates["bare"])
        print(f"{path.split('/')[-1]:<30}{name:<11}{cfg.data.image_size:>5}{batch:>6}{rates['train']:>9.1f}"
              f"{rates['bare']:>9.1f}{ratios[-1]:>8.2f}{infer:>9.1f}", flush=True)
        del model, optimizer
    return ratios


if __name__ == "__main__":
    main()
