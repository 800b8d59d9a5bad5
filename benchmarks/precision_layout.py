"""Training throughput by precision and memory format, measured back to back on the same model, size and batch.

    python benchmarks/precision_layout.py [--backbones resnet18 resnet50] [--sizes 64 224] [--batch 32] [--steps 8]

For each backbone and image size: fp32 NCHW, fp32 channels_last, bf16 NCHW, bf16 channels_last (and fp16 on CUDA),
as img/s of the pipeline's training step (engine.train_one_epoch, fused AdamW, on CPU small_conv's weight gradients as
`pipeline run` has them) on synthetic tensors, with the ratio to fp32 NCHW.
Rounds alternate between the settings and the median is kept, so a noisy shared machine hurts every column alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch, which imports tqdm: bars would interleave with the table

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.models import backbones
from pipeline.platform import cpu_kernels, devices, small_conv  # noqa: E402
from pipeline.tasks.classification.task import Classifier  # noqa: E402
from pipeline.train import engine, optim


def settings_for(device: torch.device) -> list[tuple[str, str, bool]]:
    rows = [("fp32", "fp32", False), ("fp32+CL", "fp32", True), ("bf16", "bf16", False), ("bf16+CL", "bf16", True)]
    if device.type == "cuda":
        rows += [("fp16+CL", "fp16", True)]
    return rows


def step_rate(model, batch, steps: int, settings: engine.StepSettings) -> float:
    opt = optim.build_optimizer([{"params": list(model.parameters()), "base_lr": 1e-3}], "adamw", 1e-3, 0.9, True,
                                 (0.9, 0.999), dense_adamw=cpu_kernels.enabled("auto", settings.device))
    scaler = torch.amp.GradScaler(settings.device.type) if settings.precision == "fp16" else None
    loss = lambda m, b: {"ce": F.cross_entropy(m(b[0]).float(), b[1])}  # noqa: E731
    state, schedule = engine.FitState(), optim.Schedule("constant", steps)
    model.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    engine.train_one_epoch(model, loss, [batch] * 2, opt, schedule, scaler, state, settings, log=lambda *a: None)
    sync(settings.device)
    start = time.perf_counter()
    engine.train_one_epoch(model, loss, [batch] * steps, opt, schedule, scaler, state, settings, log=lambda *a: None)
    sync(settings.device)
    return steps * len(batch[0]) / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = devices.resolve_device("auto")
    rows = settings_for(device)
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), batch {args.batch}, "
          f"{torch.get_num_threads()} threads; img/s (x fp32 NCHW)")
    print(f"{'backbone':<10}{'size':>5}" + "".join(f"{name:>18}" for name, _, _ in rows))
    summary = []
    for name in args.backbones:
        torch.manual_seed(0)
        model = Classifier(backbones.build(name, "none"), 10).to(device)
        if device.type == "cpu":
            small_conv.convert(model)  # as `pipeline run` trains on CPU
        for size in args.sizes:
            batch = (torch.randn(args.batch, 3, size, size, device=device),
                     torch.randint(0, 10, (args.batch,), device=device))
            rates: dict[str, list[float]] = {r[0]: [] for r in rows}
            for _ in range(args.rounds):
                for label, precision, cl in rows:
                    s = engine.StepSettings(device=device, precision=precision, channels_last=cl, log_every=10**9)
                    rates[label].append(step_rate(model, batch, args.steps, s))
            med = {k: statistics.median(v) for k, v in rates.items()}
            base = med["fp32"]
            print(f"{name:<10}{size:>5}" + "".join(f"{med[k]:>10.1f} ({med[k] / base:3.1f}x)" for k in med))
            best = max(med, key=med.get)
            summary.append(f"{name}@{size}: bf16+CL {med['bf16+CL'] / base:.2f}x fp32 (best {best})")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":
    main()
