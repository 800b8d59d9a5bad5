"""The optimizer over fine-tuning's param groups, and the learning-rate schedule that scales every group alike."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.platform.dense_adamw import DenseAdamW


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float, nesterov: bool,
                    betas: tuple[float, float], dense_adamw: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW, fused where PyTorch has a fused kernel for the parameters' device (CPU and CUDA): one kernel
    for all parameters instead of a loop over them. On this 2-core CPU, AdamW's step on resnet18 takes 9 ms fused
    against 28-46 ms looped (benchmarks/engine_overhead.py shows the whole step). With `dense_adamw` (the runner passes
    `cpu_kernels.enabled(train.cpu_kernels, device)`: on for CPU training unless switched off), AdamW is `DenseAdamW`,
    which spares the CPU kernel a copy of every channels_last weight; fused SGD still makes those copies. By default,
    the stock optimizers."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, fused=fused)
    return (DenseAdamW if dense_adamw else torch.optim.AdamW)(groups, lr=lr, betas=betas, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """lr factor per optimizer step: linear warmup, then cosine | step | poly | constant. Every group gets the same
    factor times its own `base_lr`, so the ratios between stages hold through warmup and decay."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    milestones: tuple[int, ...] = ()  # in steps
    gamma: float = 0.1
    power: float = 0.9

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "poly":
            return self.min_ratio + (1 - self.min_ratio) * (1 - t) ** self.power
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * f


def make_schedule(kind: str, epochs: int, steps_per_epoch: int, warmup_epochs: float, min_ratio: float,
                  milestones_epochs: list[int], gamma: float, power: float) -> Schedule:
    return Schedule(kind=kind, total_steps=epochs * steps_per_epoch,
                    warmup_steps=round(warmup_epochs * steps_per_epoch),
                    min_ratio=min_ratio, milestones=tuple(m * steps_per_epoch for m in milestones_epochs),
                    gamma=gamma, power=power)
