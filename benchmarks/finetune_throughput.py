"""Training throughput by fine-tuning strategy, measured in one run on the same model, image size and batch.

    python benchmarks/finetune_throughput.py [--backbone resnet18] [--size 224] [--batch 32] [--steps 6]

Prints img/s of the pipeline's own training step (engine.train_one_epoch) for: full fine-tuning, stem..layer3 frozen,
the whole backbone frozen, and the head alone on cached features (what epochs after the first cost with
finetune.cache_features), each with its ratio to full fine-tuning. Synthetic tensors: this measures the model, not
the loader. Absolute numbers vary on a shared machine; the ratios, measured back to back, hold.
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.models import backbones
from pipeline.platform import cpu_kernels, devices
from pipeline.tasks.classification.task import Classifier
from pipeline.train import engine, finetune, optim

STRATEGIES = {
    "full": [],
    "frozen stem..layer3": ["stem", "layer1", "layer2", "layer3"],
    "frozen backbone": "all",
    "cached features": "all",
}


def measure(model: Classifier, freeze, cached: bool, args, settings: engine.StepSettings) -> float:
    plan = finetune.make_plan(model, freeze=freeze, bn="frozen", lr_mult={}, layer_decay=None, unfreeze={},
                              no_decay_norm_bias=True, epochs=1)
    finetune.apply(model, plan, 0)
    opt = optim.build_optimizer(finetune.param_groups(model, plan, 1e-3, 0.05), "adamw", 1e-3, 0.9, True,
                                 (0.9, 0.999), dense_adamw=cpu_kernels.enabled("auto", settings.device))
    model.input_is_features = cached
    shape = (args.batch, model.backbone.num_features) if cached else (args.batch, 3, args.size, args.size)
    batches = [(torch.randn(shape), torch.randint(0, 10, (args.batch,))) for _ in range(4)]
    steps = args.steps * (50 if cached else 1)  # head-only steps take microseconds: time more of them
    loader = [batches[i % 4] for i in range(steps)]
    loss = lambda m, b: {"ce": torch.nn.functional.cross_entropy(m(b[0]).float(), b[1])}  # noqa: E731
    state = engine.FitState()
    schedule = optim.Schedule("constant", steps)
    engine.train_one_epoch(model, loss, loader[:3], opt, schedule, None, state, settings, log=lambda *a: None)  # warm
    start = time.perf_counter()
    engine.train_one_epoch(model, loss, loader, opt, schedule, None, state, settings, log=lambda *a: None)
    return steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    device = devices.resolve_device("auto")
    precision = devices.resolve_precision(args.precision, device)
    settings = engine.StepSettings(device=device, precision=precision, channels_last=True, log_every=10**9)
    torch.manual_seed(0)
    model = Classifier(backbones.build(args.backbone, "none"), 10).to(device, memory_format=torch.channels_last)
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, {device}, {precision} + channels_last, "
          f"{torch.get_num_threads()} threads")
    rates = {name: measure(model, freeze, name == "cached features", args, settings)
             for name, freeze in STRATEGIES.items()}
    full = rates["full"]
    print(f"{'strategy':<22}{'img/s':>10}{'x full':>9}")
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>10.1f}{rate / full:>9.1f}")
    print("summary: " + ", ".join(f"{name} {rate / full:.1f}x" for name, rate in rates.items() if name != "full"))


if __name__ == "__main__":
    main()
