"""Where a Faster R-CNN training step goes, and what the gather-based RoIAlign saves against torchvision's kernel.

    python benchmarks/detection_step.py [TASK_FILE] [--set key=value ...] [--steps 3] [--rounds 3] [--top 15]

Prints, for the task file's model and batch (default tasks/detection_shapes.yaml): step time with torchvision's
MultiScaleRoIAlign and with the pipeline's (alternating, medians), the step split into the forward pass of each
detector part, the backward pass and the optimizer step, and the operators that take the most time in one step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import _common as C
from torch.profiler import ProfilerActivity, profile
from torchvision.ops import MultiScaleRoIAlign

from pipeline.platform import devices
from pipeline.train import engine

PARTS = ("backbone", "fpn", "rpn", "roi_heads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_file", nargs="?", default="tasks/detection_shapes.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="Task file overrides, e.g. train.precision=fp32.")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cfg, task, train_ds, _, info = C.load_task(args.task_file, tuple(args.set))
    device = devices.resolve_device(cfg.train.device)
    s = engine.StepSettings(device=device, precision=devices.resolve_precision(cfg.train.precision, device),
                            channels_last=cfg.train.channels_last)
    model, optimizer = C.build_model(cfg, task, info, None, device, cfg.train.channels_last)
    batches = C.first_batches(train_ds, cfg.data.batch_size, 2, task)
    print(f"{C.device_line(device, s.precision)}; {args.task_file}: {cfg.model.backbone.name}, batch "
          f"{cfg.data.batch_size}, {cfg.model.min_size}-{cfg.model.max_size} px")

    ours = model.roi_heads.box_roi_pool
    theirs = MultiScaleRoIAlign(ours.featmap_names, ours.output_size, ours.sampling_ratio)

    def rate_with(pool) -> float:
        model.roi_heads.box_roi_pool = pool
        return C.bare_rate(model, task.loss, optimizer, batches, args.steps, s)

    rates = C.alternate({"torchvision": lambda: rate_with(theirs), "pipeline": lambda: rate_with(ours)}, args.rounds)
    per_step = {k: cfg.data.batch_size / v for k, v in rates.items()}
    print(f"step time: torchvision RoIAlign {per_step['torchvision']:.3f}s, pipeline RoIAlign "
          f"{per_step['pipeline']:.3f}s ({per_step['torchvision'] / per_step['pipeline']:.2f}x faster)")
    model.roi_heads.box_roi_pool = ours
    split = step_split(model, task.loss, optimizer, batches, args.rounds, s)
    total = sum(split.values())
    print("one step: " + ", ".join(f"{k} {v:.3f}s ({v / total:.0%})" for k, v in split.items()))
    batch = devices.to_device(batches[0], device, s.channels_last)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(model, task.loss, optimizer, batch, s)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))


def one_step(model, loss, optimizer, batch, s: engine.StepSettings) -> None:
    with devices.autocast(s.device, s.precision):
        total = sum(loss(model, batch).values())
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_split(model, loss, optimizer, batches: list, rounds: int, s: engine.StepSettings) -> dict[str, float]:
    """Median seconds of each part's forward pass, the backward pass and the optimizer step."""
    marks: dict[str, float] = {}
    hooks = []
    for name in PARTS:
        module = getattr(model, name)
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: marks.__setitem__(name, _now(s))))
        hooks.append(module.register_forward_hook(
            lambda m, a, o, name=name: marks.__setitem__(name, _now(s) - marks[name])))
    taken: dict[str, list[float]] = {}
    model.train()
    for i in range(rounds + 1):
        batch = devices.to_device(batches[i % len(batches)], s.device, s.channels_last)
        start = _now(s)
        with devices.autocast(s.device, s.precision):
            total = sum(loss(model, batch).values())
        forward_end = _now(s)
        total.backward()
        backward_end = _now(s)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = _now(s)
        if i == 0:
            continue  # warm-up
        parts = {f"{name} fwd": marks[name] for name in PARTS}
        parts["other fwd"] = forward_end - start - sum(parts.values())  # the resize and batching of images
        parts.update({"backward": backward_end - forward_end, "optimizer": end - backward_end})
        for key, value in parts.items():
            taken.setdefault(key, []).append(value)
    for hook in hooks:
        hook.remove()
    return {key: statistics.median(values) for key, values in taken.items()}


def _now(s: engine.StepSettings) -> float:
    C.sync(s.device)
    return time.perf_counter()


if __name__ == "__main__":
    main()
