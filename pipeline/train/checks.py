"""Checks at the start of a run: settings that are valid but waste the run, each said as one warning line.

They need the data's sizes, so the runner calls `at_start` once the datasets are built, before any weights load:

- `train.warmup_epochs` >= `train.epochs`: the learning rate is still rising when the run ends;
- a schedule that never reaches `train.lr` (e.g. `train.schedule=step` with a milestone at epoch 0);
- a val set smaller than the number of classes (tasks with one class per image): some class is never validated;
- `data.batch_size` larger than the train set: every epoch is one partial batch, one optimizer step;
- classes 10x or more apart in training images (`DataInfo.class_counts`) while `data.balance` is none: the model will
  mostly predict the big classes; the line names the task's data.balance options.

Errors stay errors elsewhere (a batch size that leaves a process no batch at all fails in `runner.make_loaders`).
"""
from __future__ import annotations

import typing

from pipeline.config.sections import DataConfig, TaskConfig, TrainConfig
from pipeline.tasks.base import Task, TaskData
from pipeline.train import optim


def at_start(cfg: TaskConfig, task: Task, data: TaskData, world: int = 1) -> list[str]:
    num_classes = data.info.num_classes if task.one_class_per_image else None
    found = warnings(cfg.train, cfg.data.batch_size, len(data.train), len(data.val), num_classes, world)
    imbalance = imbalance_warning(data.info.class_counts, data.info.classes, cfg.data) \
        if data.info.class_counts and cfg.data.balance == "none" else None
    return found + ([imbalance] if imbalance else [])


IMBALANCE = 10  # the largest class holding this many times the images of the smallest is worth a warning


def imbalance_warning(counts: list[int], classes: list[str], data: DataConfig) -> str | None:
    """One line when the largest class has IMBALANCE times the training images of the smallest (classes without any
    are left out: they cannot be balanced), naming the data.balance values this task's schema offers."""
    held = [(n, name) for n, name in zip(counts, classes) if n > 0]
    if len(held) < 2:
        return None
    (small, small_name), (large, large_name) = min(held, key=lambda c: c[0]), max(held, key=lambda c: c[0])
    if large < IMBALANCE * small:
        return None
    options = [v for v in typing.get_args(type(data).model_fields["balance"].annotation) if v != "none"]
    if not options:
        return None
    return (f"class '{large_name}' has {large} training images and '{small_name}' {small} ({large / small:.0f}x): "
            f"a model trained on them mostly predicts the big classes; set "
            f"{' or '.join(f'data.balance={o}' for o in options)}")


def warnings(t: TrainConfig, batch_size: int, train_size: int, val_size: int, num_classes: int | None = None,
             world: int = 1) -> list[str]:
    """The warning lines for these settings and sizes; empty when nothing looks wasted."""
    found = [schedule_warning(t, steps_per_epoch(train_size, batch_size, t.accum_steps, world))]
    if num_classes is not None and 0 < val_size < num_classes:
        found.append(f"the val set holds {val_size} images for {num_classes} classes, so at least "
                     f"{num_classes - val_size} classes are never validated and the metrics move in steps of "
                     f"{1 / val_size:.0%}; give every class val images (more in val/, or data.val_fraction)")
    if batch_size > train_size > 0:
        found.append(f"data.batch_size={batch_size} is larger than the {train_size} training images: every "
                     f"epoch is one batch of {train_size}, one optimizer step; lower data.batch_size "
                     f"(e.g. {max(1, train_size // 4)})")
    return [line for line in found if line]


def steps_per_epoch(train_size: int, batch_size: int, accum_steps: int, world: int = 1) -> int:
    """Optimizer steps per epoch as `runner.loaders` will batch: full batches of each process's share (one partial
    batch when the batch is larger than the whole train set), then accumulation."""
    share = -(-train_size // world)
    batches = share // batch_size if train_size > batch_size else 1
    return max(1, -(-batches // accum_steps))


def schedule_warning(t: TrainConfig, steps: int) -> str | None:
    lr = f"{t.lr:g}" if t.lr != "auto" else "auto (the range test's suggestion)"
    schedule = optim.make_schedule(t.schedule, t.epochs, steps, t.warmup_epochs, t.min_lr_ratio, t.step_milestones,
                                    t.step_gamma, t.poly_power)
    peak = peak_factor(schedule)
    if t.warmup_epochs >= t.epochs:
        reached = "reaches it only at the last step" if peak >= 0.999 else f"peaks at {peak:.0%} of it"
        return (f"train.warmup_epochs={t.warmup_epochs:g} >= train.epochs={t.epochs}: the learning rate rises "
                f"towards train.lr={lr} for the whole run and {reached}; set train.warmup_epochs below "
                f"train.epochs (e.g. {round(0.15 * t.epochs, 2):g})")
    if peak < 0.999:
        return (f"the learning rate never reaches train.lr={lr}: train.schedule={t.schedule} peaks at "
                f"{peak:.0%} of it (train.step_milestones={t.step_milestones}); start the milestones after "
                "train.warmup_epochs and epoch 0")
    return None


def peak_factor(schedule: optim.Schedule) -> float:
    """The largest lr factor over the run's steps. Warmup rises and every schedule after it only falls or holds, so
    the peak is at the last warmup step or the first step after warmup."""
    candidates = {0, min(schedule.warmup_steps, schedule.total_steps) - 1}
    if schedule.warmup_steps < schedule.total_steps:
        candidates.add(schedule.warmup_steps)
    return max(schedule.factor(step) for step in candidates if step >= 0)
