"""Shared by the benchmarks: a task's model and real batches from its synthetic dataset, and the timed loops.

Every timing alternates between the things compared (A B A B ...) and keeps the median, so load from other processes
on a shared machine slows every column alike and the printed ratios hold even when absolute numbers wander.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the tables

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.platform import devices  # noqa: E402
from pipeline.tasks import registry  # noqa: E402
from pipeline.tasks.base import TRAIN_ERROR  # noqa: E402
from pipeline.train import builders, distributed, engine, optim, runner  # noqa: E402


def load_task(task_file: str, overrides: tuple[str, ...] = ()):
    """Config, task, datasets and data info of a task file, through the runner's own builders (runner.prepare,
    builders.build_data); its synthetic data is generated when missing."""
    setup = runner.prepare(task_file, overrides)
    data = builders.build_data(setup)
    return setup.cfg, setup.task, data.train, data.val, data.info


def loader(dataset, batch_size: int, workers: int, shuffle: bool = True, task=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=True,
                      collate_fn=task.collate_fn if task else None, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(0))


def first_batches(dataset, batch_size: int, n: int, task=None) -> list:
    return list(itertools.islice(loader(dataset, batch_size, 0, task=task), n))


def build_model(cfg, task, info, backbone: str | None, device: torch.device, channels_last: bool):
    """The task's model as `pipeline run` trains it (builders.build_model, plan_finetune, place_model with the CPU fast
    paths, make_optimizer), random init."""
    b = cfg.model.backbone.model_copy(update={"name": backbone or cfg.model.backbone.name, "weights": "none"})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": b}),
                                 "train": cfg.train.model_copy(update={"channels_last": channels_last})})
    setup = builders.Setup(cfg, task, registry.entry(cfg.task).primary, task_file="", experiment="",
                           output_dir=Path("."), last=None, device=device,
                           precision=devices.resolve_precision(cfg.train.precision, device), ctx=distributed.Context())
    model = builders.build_model(setup, info)
    plan = builders.plan_finetune(setup, model)
    model = builders.place_model(setup, model, plan)
    optimizer = builders.make_optimizer(setup, model, plan)
    BENCH_SCHEDULE.apply(optimizer, 0)
    return model, optimizer


def _quiet(*_) -> None:
    """Benchmarks print their tables, not the runner's lines."""


# Benchmarks step at the first lr of a long warmup: speed does not depend on the lr, and a random-init detector at its
# task file's full lr without warmup can diverge within a benchmark's few dozen steps (seen on an H100).
BENCH_SCHEDULE = optim.Schedule("constant", 1, warmup_steps=1000)


class Sized:
    """`steps` items cycling over `batches` (or over a loader, restarted as needed), with a length for the engine."""

    def __init__(self, source, steps: int) -> None:
        self.source, self.steps = source, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.source) if isinstance(self.source, list)
                                else _restarting(self.source), self.steps)


def _restarting(source):
    while True:
        yield from source


def pipeline_rate(model, loss, optimizer, source, steps: int, s: engine.StepSettings) -> float:
    """img/s of engine.train_one_epoch: the pipeline's own training step, progress bar and logging included."""
    result = engine.train_one_epoch(model, loss, Sized(source, steps), optimizer, BENCH_SCHEDULE, None,
                                    engine.FitState(), s, log=lambda *a: None)
    return result["train/throughput"]


def bare_rate(model, loss, optimizer, source, steps: int, s: engine.StepSettings) -> float:
    """img/s of the loop anyone would write by hand: device copy, autocast, backward, step. Nothing else."""
    model.train()
    images = 0
    sync(s.device)
    start = time.perf_counter()
    for batch in Sized(source, steps):
        batch = devices.to_device(batch, s.device, s.channels_last)
        with devices.autocast(s.device, s.precision):
            total = sum(v for k, v in loss(model, batch).items() if k != TRAIN_ERROR)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += devices.batch_len(batch)
    sync(s.device)
    return images / (time.perf_counter() - start)


@torch.no_grad()
def inference_rate(model, predict, batches: list, steps: int, s: engine.StepSettings) -> float:
    model.eval()
    images = 0
    sync(s.device)
    start = time.perf_counter()
    for batch in Sized(batches, steps):
        batch = devices.to_device(batch, s.device, s.channels_last)
        with devices.autocast(s.device, s.precision):
            predict(model, batch)
        images += devices.batch_len(batch)
    sync(s.device)
    return images / (time.perf_counter() - start)


def alternate(measures: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, float]:
    """Median of `rounds` measurements of each, taken in turns (forward, then backward) after one warm-up each
    (`warmup=False`: measures that warm themselves up, such as whole runs)."""
    for measure in measures.values() if warmup else ():
        measure()
    taken: dict[str, list[float]] = {name: [] for name in measures}
    order = list(measures)
    for r in range(rounds):
        # Reversed every other round: a measurement's position in a round (caches, clocks) must not favour it.
        for name in order if r % 2 == 0 else order[::-1]:
            taken[name].append(measures[name]())
    return {name: statistics.median(v) for name, v in taken.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    """The CPU's model name, whether it has AMX and AVX512-BF16 (what bf16 buys depends on them)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return (f"{name}; AMX: {'yes' if 'amx_bf16' in flags else 'no'}; "
            f"AVX512-BF16: {'yes' if 'avx512_bf16' in flags else 'no'}")


def device_line(device: torch.device, precision: str) -> str:
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"{device} ({what}), {precision}"
