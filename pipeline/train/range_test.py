"""The learning-rate range test (Smith, "Cyclical learning rates", 2017; fastai's lr_find), from a run's real start.

The optimizer the run would use steps through batches of its training data while the learning rate grows
exponentially from `start_lr` to `end_lr` over at most `steps` steps (the training set repeats, epoch after epoch of
its own order, when it has fewer batches). Every group gets that lr times its stage's multiplier, so the multipliers
keep their ratios. The test stops when the loss diverges: a running average of it (beta 0.9, bias-corrected) passes 4x
its lowest value, or a loss is not finite.

The suggestion reads a smoothed curve: each step's loss averaged with its neighbours' (a centred window of about a
twelfth of the steps), which, unlike a running average, does not lag behind the lr (with 100 steps over eight decades,
fastai's running average of beta 0.98 spans about four decades). Two rules:

- steepest (default): the lr where the smoothed loss falls fastest per decade of lr, before its lowest point (Smith's
  and fastai v1's choice). A curve that never falls by 10% below its start has no descent to read: a network far from
  trained (random init), which the test's few small steps barely move, only shows where a larger lr starts to hurt;
  the suggestion is then that edge, the largest lr whose smoothed loss is still within 2% of its lowest. For the
  schedules here train.lr is the peak lr, after the warm-up: the edge is what the peak may reach.
- minimum: a tenth of that edge (of the valley's far side where the loss falls and turns): a more cautious lr.

The test trains, so `measure` restores what it changed: the weights and buffers (BatchNorm statistics), the train/eval
mode, and the Python, NumPy and torch RNG states; its optimizer is its own, dropped afterwards. The run then starts
from exactly where it would have started without the test.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train import checkpoint, finetune
from pipeline.train.engine import StepSettings, forward_loss, optimizer_step

RUNNING = 0.9  # the running average that watches for divergence
DIVERGED = 4.0  # the running average this many times its lowest value: the test stops
WITHIN = 0.02  # the edge: the largest lr whose smoothed loss is within this share of the lowest
FELL = 0.10  # a curve falls when its lowest smoothed loss is this share below its start
MIN_STEPS = 5  # fewer points than this make no curve


@dataclass
class Curve:
    lrs: list[float]  # the lr of each step taken (train.lr's place; groups got it times their multiplier)
    losses: list[float]
    planned: int  # steps the ramp had
    stopped: str  # why the test ended
    suggest: str  # the rule the suggestion follows: steepest | minimum

    @property
    def smoothed(self) -> list[float]:
        """Each loss averaged over a centred window of about a twelfth of the planned steps (fewer at the ends)."""
        half = max(1, self.planned // 24)
        x = np.asarray(self.losses)
        return [float(x[max(0, i - half): i + half + 1].mean()) for i in range(len(x))]

    @property
    def lowest(self) -> int:
        return int(np.argmin(self.smoothed))

    @property
    def turn(self) -> int:
        """The last step, up to where the loss passes twice its lowest, whose smoothed loss is within WITHIN of the
        lowest."""
        smooth = np.asarray(self.smoothed)
        low = smooth[self.lowest]
        beyond = np.flatnonzero(smooth[self.lowest:] > 2 * low)
        end = self.lowest + (int(beyond[0]) if len(beyond) else len(smooth) - self.lowest)
        return int(np.flatnonzero(smooth[:end] <= low * (1 + WITHIN))[-1])

    @property
    def falls(self) -> bool:
        """Whether the smoothed loss ever gets FELL below its start (its mean over the first tenth of the steps)."""
        smooth = self.smoothed
        start = float(np.mean(smooth[: max(1, len(smooth) // 10)]))
        return smooth[self.lowest] <= (1 - FELL) * start

    @property
    def steepest(self) -> int:
        """The step where the smoothed loss falls fastest against log10(lr), before its lowest point."""
        upto = self.lowest + 1
        if upto < 2:
            return self.lowest
        slope = np.gradient(np.asarray(self.smoothed[:upto]), np.log10(self.lrs[:upto]))
        return int(np.argmin(slope))

    @property
    def suggestion(self) -> float:
        if self.suggest == "minimum":
            return self.lrs[self.turn] / 10
        return self.lrs[self.steepest] if self.falls else self.lrs[self.turn]

    def how(self) -> str:
        """How the suggestion was chosen, and what the other rule gives."""
        turn, low, steep = self.turn, self.lowest, self.steepest
        edge = (f"the largest lr whose smoothed loss ({self.smoothed[turn]:.4f}) is within {WITHIN:.0%} of the lowest "
                f"({self.smoothed[low]:.4f} at {self.lrs[low]:.2e})")
        if self.suggest == "minimum":
            return f"a tenth of {self.lrs[turn]:.2e}, {edge}; the steepest descent was at {self.lrs[steep]:.2e}"
        if self.falls:
            return (f"where the smoothed loss fell fastest ({self.smoothed[0]:.4f} -> {self.smoothed[low]:.4f} at "
                    f"{self.lrs[low]:.2e}); the minimum rule gives {self.lrs[turn] / 10:.2e}")
        return (f"the loss never fell {FELL:.0%} (a network the test's steps barely move), so {edge}, before it "
                f"climbs; the minimum rule gives {self.lrs[turn] / 10:.2e}")

    def line(self) -> str:
        return (f"suggested train.lr={self.suggestion:.2e}: {self.how()} ({len(self.lrs)} of {self.planned} steps, "
                f"{self.stopped})")


def ramp(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates from `start` to `end`, evenly spaced in log."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def measure(model: nn.Module, loss_fn: Callable, loader: Iterable, groups: list[dict],
            build_optimizer: Callable[[list[dict]], torch.optim.Optimizer], s: StepSettings, fp16: bool,
            start: float, end: float, steps: int, suggest: str = "steepest", mix: Callable | None = None) -> Curve:
    """The range test over `groups` (param groups built for a base lr of 1: each `base_lr` is its multiplier), with an
    optimizer from `build_optimizer` and the run's batch mixer `mix` (mixup, cutmix) if it has one; the model, its mode
    and the RNG states are as before when it returns."""
    finetune.require_trainable(groups, "lr-find")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng, training = checkpoint.rng_state(), model.training
    try:
        return _ramp_through(model, loss_fn, loader, build_optimizer(groups), s, fp16,
                             ramp(start, end, steps), suggest, mix)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(training)
        checkpoint.set_rng_state(rng)


def _ramp_through(model: nn.Module, loss_fn: Callable, loader: Iterable, optimizer: torch.optim.Optimizer,
                  s: StepSettings, fp16: bool, lrs: list[float], suggest: str, mix: Callable | None) -> Curve:
    model.train()
    scaler = torch.amp.GradScaler(s.device.type) if fp16 else None
    batches = _repeat(loader)
    taken, losses = [], []
    average, lowest, stopped = 0.0, math.inf, "reached lr_find.end_lr"
    for step, lr in enumerate(lrs):
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr
        loss = 0.0
        for micro in range(s.accum_steps):
            # epoch 0: mixing keys training never uses
            total, _ = forward_loss(model, loss_fn, next(batches), s, mix, (0, step * s.accum_steps + micro))
            (scaler.scale(total / s.accum_steps) if scaler else total / s.accum_steps).backward()
            loss += total.item() / s.accum_steps
        if not math.isfinite(loss):
            stopped = f"stopped at lr {lr:.2e}: the loss was not finite"
            break
        optimizer_step(model, optimizer, scaler, s.clip_grad_norm)
        taken.append(lr)
        losses.append(loss)
        average = RUNNING * average + (1 - RUNNING) * loss
        running = average / (1 - RUNNING ** (step + 1))
        lowest = min(lowest, running)
        if running > DIVERGED * lowest:
            stopped = f"stopped at lr {lr:.2e}: the loss passed {DIVERGED:g}x its lowest"
            break
    if len(taken) < MIN_STEPS:
        raise UserError(f"lr-find: the loss diverged after {len(taken)} steps, at lr {lrs[len(taken)]:.2e}; lower "
                        f"lr_find.start_lr (now {lrs[0]:.1e}), or look for broken labels or images")
    return Curve(taken, losses, len(lrs), stopped, suggest)


def _repeat(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch in each epoch's own order (the sampler's `set_epoch`)."""
    sampler = getattr(loader, "sampler", None)
    for epoch in itertools.count(1):
        if hasattr(sampler, "set_epoch"):  # as engine.fit: the order of an epoch depends on it
            sampler.set_epoch(epoch)
        yield from loader


def figure(curve: Curve):
    """The loss (raw and smoothed) against the learning rate, the suggestion marked."""
    import matplotlib  # only when drawing: a run without the test needs no matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(curve.lrs, curve.losses, color="0.75", lw=1, label="loss")
    ax.plot(curve.lrs, curve.smoothed, color="C0", lw=2, label="smoothed loss")
    ax.axvline(curve.suggestion, color="C3", ls="--", label=f"suggested lr {curve.suggestion:.2e} ({curve.suggest})")
    smooth = curve.smoothed
    ax.plot([curve.lrs[curve.lowest]], [smooth[curve.lowest]], "o", color="C1", label="lowest smoothed loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (train.lr; each stage x its lr_mult)")
    ax.set_ylabel("training loss")
    top = max(smooth[: curve.lowest + 1])
    ax.set_ylim(min(smooth) * 0.9 if min(smooth) > 0 else None, top * 1.6 if top > 0 else None)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("learning-rate range test")
    return fig


def record(tracker, curve: Curve) -> None:
    """The test on an MLflow run (a `Tracker`): the suggestion and its rule as params (`lr_find.suggested_lr`,
    `lr_find.rule`), the curve as per-step metrics (`lr_find/lr`, `lr_find/loss`, `lr_find/smoothed_loss`) and as
    `lr_find/curve.png` and `lr_find/curve.csv`."""
    import matplotlib.pyplot as plt

    tracker.log_params({"lr_find.suggested_lr": f"{curve.suggestion:.3e}", "lr_find.rule": curve.suggest})
    rows = list(zip(curve.lrs, curve.losses, curve.smoothed))
    for step, (lr, loss, smooth) in enumerate(rows):
        tracker.log_metrics({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smooth}, step)
    text = "".join(f"{lr:.6e},{loss:.6f},{smooth:.6f}\n" for lr, loss, smooth in rows)
    tracker.log_text("lr,loss,smoothed_loss\n" + text, "lr_find/curve.csv")
    fig = figure(curve)
    tracker.log_figure(fig, "lr_find/curve.png")
    plt.close(fig)
