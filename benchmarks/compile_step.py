"""`train.compile: true` (torch.compile) against eager, on the pipeline's training step.

    python benchmarks/compile_step.py [--backbone resnet18] [--sizes 64 128] [--batch 32] [--steps 10] [--rounds 3]

For each size: seconds to compile (the first training step, forward and backward), then steady-state img/s of
engine.train_one_epoch in eager and compiled mode, measured in turns, with the ratio and the number of steps after
which compiling has paid for itself. Precision and memory format as `pipeline run` picks them on this machine; on
CPU the eager model has small_conv's convolutions and the compiled one plain ones, as `pipeline run` trains them.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.models import backbones
from pipeline.platform import cpu_kernels, devices, small_conv  # noqa: E402
from pipeline.tasks.classification.task import Classifier  # noqa: E402
from pipeline.train import engine, optim


def run_steps(model, opt, batch, steps: int, s: engine.StepSettings) -> float:
    loss = lambda m, b: {"ce": F.cross_entropy(m(b[0]).float(), b[1])}  # noqa: E731
    state, schedule = engine.FitState(), optim.Schedule("constant", steps)
    start = time.perf_counter()
    engine.train_one_epoch(model, loss, [batch] * steps, opt, schedule, None, state, s, log=lambda *a: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = devices.resolve_device("auto")
    precision = devices.resolve_precision("auto", device)
    s = engine.StepSettings(device=device, precision=precision, channels_last=True, log_every=10**9)
    print(f"{args.backbone}, batch {args.batch}, {device} {precision} + channels_last "
          f"({torch.get_num_threads()} threads)")
    print(f"{'size':>5}{'compile s':>11}{'eager img/s':>13}{'compiled':>10}{'x':>6}{'pays off after':>16}")
    summary = []
    for size in args.sizes:
        torch.manual_seed(0)
        eager = Classifier(backbones.build(args.backbone, "none"), 10).to(device, memory_format=torch.channels_last)
        compiled = copy.deepcopy(eager)  # plain convs, as `pipeline run` compiles them
        if device.type == "cpu":
            small_conv.convert(eager)  # as `pipeline run` trains without train.compile
        compiled.compile()
        batch = (torch.randn(args.batch, 3, size, size, device=device),
                 torch.randint(0, 10, (args.batch,), device=device))
        opts = {m: optim.build_optimizer([{"params": list(m.parameters()), "base_lr": 1e-4}], "adamw", 1e-4, 0.9,
                                          True, (0.9, 0.999), dense_adamw=cpu_kernels.enabled("auto", s.device))
                for m in (eager, compiled)}
        first = run_steps(compiled, opts[compiled], batch, 1, s)
        run_steps(eager, opts[eager], batch, 1, s)
        times = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
                model = eager if name == "eager" else compiled
                times[name].append(run_steps(model, opts[model], batch, args.steps, s) / args.steps)
        step = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: args.batch / v for k, v in step.items()}
        gain = step["eager"] - step["compiled"]
        pays = f"{(first - step['compiled']) / gain:.0f} steps" if gain > 0 else "never"
        print(f"{size:>5}{first:>11.1f}{rate['eager']:>13.1f}{rate['compiled']:>10.1f}"
              f"{rate['compiled'] / rate['eager']:>6.2f}{pays:>16}")
        summary.append(f"{size} px {rate['compiled'] / rate['eager']:.2f}x after {first:.0f}s compiling")
    print(f"summary: compiled vs eager {args.backbone}: {', '.join(summary)}")


if __name__ == "__main__":
    main()
