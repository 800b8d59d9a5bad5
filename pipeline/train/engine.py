"""The training engine: train_one_epoch, evaluate, and fit (epochs, checkpoints, unfreezing, early stopping). It never
asks which task it runs: tasks give `loss(model, batch) -> dict` and `predict(model, batch)`, an evaluator with
`update(outputs, batch)` and `compute()`, and their primary metric (which one, and which way is better).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import console
from pipeline.errors import UserError
from pipeline.platform.devices import autocast, batch_len, to_device
from pipeline.platform.threads import Governor
from pipeline.tasks.base import TRAIN_ERROR
from pipeline.tasks.metric import Metric
from pipeline.train import checkpoint, distributed, finetune
from pipeline.train.ema import EMA
from pipeline.train.optim import Schedule

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


# ---------------------------------------------------------------------------------------------------------------------
# One epoch


@dataclass
class FitState:
    epoch: int = 0          # epochs completed
    step: int = 0           # optimizer steps taken
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history}


@dataclass(frozen=True)
class StepSettings:
    device: torch.device
    precision: str
    channels_last: bool = True
    accum_steps: int = 1
    clip_grad_norm: float | None = None
    log_every: int = 10
    max_nonfinite: int = 5
    ctx: distributed.Context = distributed.Context()  # data-parallel rank and world size (torchrun)
    grad_norms: bool = False  # log grad_norm/<stage> of the trainable stages every `log_every` steps
    threads: Governor | None = None  # CPU threads, looked at again between steps (pipeline/platform/threads.py)


def train_one_epoch(model: nn.Module, loss_fn, loader: Iterable, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, scaler: torch.amp.GradScaler | None, state: FitState, s: StepSettings,
                    log: LogFn, desc: str = "", ema: EMA | None = None,
                    mix: Callable | None = None) -> dict[str, float]:
    """One epoch of optimizer steps. `ema` follows the weights after every step; `mix` (the task's mixer: mixup,
    cutmix) blends each batch, keyed by (epoch, batch) so that a resumed run mixes as the uninterrupted one did."""
    model.train()
    steps_per_epoch = -(-len(loader) // s.accum_steps)
    total_loss = torch.zeros((), device=s.device)
    window_loss = torch.zeros((), device=s.device)
    wrong = torch.zeros((), device=s.device)  # training images the model got wrong (tasks that report TRAIN_ERROR)
    counted = 0  # images behind `wrong`
    window, images, nonfinite, micro = 0, 0, 0, 0
    waited = 0.0  # seconds spent waiting for the loader
    start = time.perf_counter()
    bar = console.bar(loader, desc, show=s.ctx.main)  # rank 0 draws, on a terminal only
    ready = time.perf_counter()
    for micro, batch in enumerate(bar, start=1):
        waited += time.perf_counter() - ready
        if s.threads is not None:
            s.threads.poll()
        n = batch_len(batch)
        loss, error = forward_loss(model, loss_fn, batch, s, mix, (state.epoch + 1, micro))
        # One host sync per step (as GradScaler has), so a diverging run stops before its weights turn to NaN; under
        # DDP every rank must agree to skip, or the others would wait for its gradients forever.
        if not distributed.all_true(s.ctx, torch.isfinite(loss)):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            if nonfinite >= s.max_nonfinite:
                raise UserError(f"loss was not finite for {nonfinite} consecutive steps (last at step {state.step}); "
                                f"lower train.lr, set train.clip_grad_norm, or use train.precision=fp32")
            ready = time.perf_counter()
            continue
        nonfinite = 0
        (scaler.scale(loss / s.accum_steps) if scaler else loss / s.accum_steps).backward()
        detached = loss.detach()
        total_loss += detached
        window_loss += detached
        window += 1
        images += n
        if error is not None:
            wrong += error.detach() * n
            counted += n
        if micro % s.accum_steps and micro != len(loader):
            ready = time.perf_counter()
            continue  # accumulate; the epoch's last batch steps even with a partial accumulation
        schedule.apply(optimizer, state.step)
        due = bool(window) and ((state.step + 1) % s.log_every == 0 or micro == len(loader))
        norms = optimizer_step(model, optimizer, scaler, s.clip_grad_norm, grad_norms=s.grad_norms and due)
        state.step += 1
        if ema is not None:
            ema.update(distributed.unwrap(model))
        if window and (state.step % s.log_every == 0 or micro == len(loader)):
            mean = distributed.mean(s.ctx, window_loss / window).item()  # the only other read of device values
            rate = images / (time.perf_counter() - start)
            lrs = _stage_lrs(optimizer)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}", img_s=f"{rate:.0f}")
            log({"train/loss": mean, **{f"lr/{k}": v for k, v in lrs.items()},
                 **{f"grad_norm/{k}": v for k, v in norms.items()}}, state.step)
            window_loss.zero_()
            window = 0
        ready = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - start
    done = max(1, micro - nonfinite)
    # Under DDP: the loss averaged over ranks and the throughput of all of them (each rank takes as many images).
    metrics = {"train/loss_epoch": distributed.mean(s.ctx, total_loss / done).item(),
               "train/throughput": images * s.ctx.world / max(elapsed, 1e-9),
               # the share of the epoch spent waiting for the next batch: what faster loading would give back
               "train/data_wait": waited / max(elapsed, 1e-9),
               "epoch_time": elapsed, "steps_per_epoch": steps_per_epoch}
    if counted:
        metrics["train/error"] = distributed.mean(s.ctx, wrong / counted).item()
    if s.threads is not None:
        metrics["train/threads"] = float(s.threads.threads)
    return metrics


def forward_loss(model: nn.Module, loss_fn, batch, s: StepSettings, mix: Callable | None,
                 key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch on the device, blended by `mix` (keyed by `key`: epoch, batch) where the run mixes, through the
    task's loss at the run's precision: the summed loss, and the task's training error (None where it logs none)."""
    batch = to_device(batch, s.device, s.channels_last)
    if mix is not None:
        batch = mix(batch, key)
    with autocast(s.device, s.precision):
        losses = loss_fn(model, batch)
        error = losses.pop(TRAIN_ERROR, None)
        return sum(losses.values()), error


def optimizer_step(model: nn.Module, optimizer, scaler, clip: float | None,
                    grad_norms: bool = False) -> dict[str, float]:
    """One optimizer step; with `grad_norms`, the gradient norm of each stage the optimizer trains, taken before
    clipping (frozen stages have no group in the optimizer, so they have no norm)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norms = stage_grad_norms(optimizer) if grad_norms else {}
    if clip is not None:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def stage_grad_norms(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The L2 norm of the gradients of each stage's parameters (its weight-decay and no-decay groups together)."""
    by_stage: dict[str, list[torch.Tensor]] = {}
    for i, g in enumerate(optimizer.param_groups):
        grads = [p.grad for p in g["params"] if p.grad is not None]
        by_stage.setdefault(g.get("stage", g.get("name", str(i))), []).extend(grads)
    stages = [(k, v) for k, v in by_stage.items() if v]
    if not stages:
        return {}
    norms = torch.stack([nn.utils.get_total_norm(v) for _, v in stages])  # one host read for all stages
    return dict(zip((k for k, _ in stages), norms.float().tolist()))


def _stage_lrs(optimizer) -> dict[str, float]:
    # One lr per stage: the `.no_decay` twin of a group has the same lr.
    return {g.get("stage", g.get("name", str(i))): g["lr"] for i, g in enumerate(optimizer.param_groups)}


@torch.no_grad()
def evaluate(model: nn.Module, predict, evaluator, loader: Iterable, s: StepSettings, desc: str = "eval",
             merge: bool = False) -> dict:
    """The evaluator's metrics over `loader`. With `merge` (a task whose evaluators merge), each data-parallel rank
    saw its shard of the validation set and the evaluators are merged across ranks first."""
    model.eval()
    for batch in console.bar(loader, desc, show=s.ctx.main):
        batch = to_device(batch, s.device, s.channels_last)
        with autocast(s.device, s.precision):
            outputs = predict(model, batch)
        evaluator.update(outputs, batch)
    if merge:
        evaluator = distributed.merge_evaluators(s.ctx, evaluator)
    return evaluator.compute()


# ---------------------------------------------------------------------------------------------------------------------
# Epochs


@dataclass
class Fit:
    """Everything `fit` needs, made by the stage runner; `extra` goes into every checkpoint (config, run id, info)."""

    model: nn.Module
    loss: Callable
    predict: Callable
    make_evaluator: Callable[[], object]
    primary: Metric  # the task's: which metric picks the best checkpoint, and whether higher or lower is better
    merge_evaluators: bool  # the task's evaluators merge: each rank evaluates a shard (see evaluate)
    train_loader: Iterable
    val_loader: Iterable
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    plan: finetune.Plan
    base_lr: float
    weight_decay: float
    settings: StepSettings
    epochs: int
    output_dir: Path
    patience: int | None = None
    keep_checkpoints: str = "last"  # all: also keep the checkpoint before last.pt (checkpoint.save_last)
    scaler: torch.amp.GradScaler | None = None
    ema: EMA | None = None  # train.ema: the average is evaluated and checkpointed as the model (pipeline/train/ema.py)
    mix: Callable | None = None  # train.mixup / train.cutmix: the task's mixer of training batches
    extra: dict = field(default_factory=dict)
    log: LogFn = lambda metrics, step: None
    on_epoch_end: Callable[[int, dict], None] = lambda epoch, metrics: None


DATA_WAIT_NOTE = 0.3  # above this share of an epoch spent waiting for batches, the console says so (once)


def fit(f: Fit, state: FitState) -> FitState:
    """Run the remaining epochs of `f`, continuing from `state` (epoch 0 for a new run)."""
    noted = False
    for epoch in range(state.epoch + 1, f.epochs + 1):
        _unfreeze(f, epoch, state.step)
        sampler = getattr(f.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # order and augmentation of an epoch depend on it, not on history
            sampler.set_epoch(epoch)
        desc = f"epoch {epoch}/{f.epochs}"
        train_metrics = train_one_epoch(f.model, f.loss, f.train_loader, f.optimizer, f.schedule, f.scaler, state,
                                        f.settings, f.log, desc=desc, ema=f.ema, mix=f.mix)
        evaluator = f.make_evaluator()
        val_metrics = evaluate(f.ema.module if f.ema else f.model, f.predict, evaluator, f.val_loader, f.settings,
                               desc=f"{desc} eval", merge=f.merge_evaluators)
        metrics = {**train_metrics, **val_metrics}
        primary = val_metrics[f.primary.name]
        improved = f.primary.better(primary, state.best)
        state.epoch = epoch
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if improved:
            state.best, state.best_epoch, state.bad_epochs = primary, epoch, 0
        else:
            state.bad_epochs += 1
        # Checkpoint first: a run killed in between resumes after this epoch and logs its metrics then (epoch_metrics).
        _save(f, state, best=improved)
        f.log(epoch_metrics(state.history[-1]), epoch)
        f.on_epoch_end(epoch, metrics)
        log.info(f"{desc}  loss {train_metrics['train/loss_epoch']:.4f}  {f.primary} {primary:.4f}"
              f"{' (best)' if improved else ''}  {train_metrics['train/throughput']:.0f} img/s  "
              f"{train_metrics['epoch_time']:.1f}s  ~{_eta(state, f.epochs)} left")
        if not noted and train_metrics["train/data_wait"] > DATA_WAIT_NOTE:
            noted = True
            log.info(data_wait_note(train_metrics["train/data_wait"], getattr(f.train_loader, "num_workers", 0)))
        if f.patience is not None and state.bad_epochs >= f.patience:
            log.info(f"early stop: {f.primary} has not improved for {state.bad_epochs} epochs "
                  f"(best {state.best:.4f} at epoch {state.best_epoch})")
            break
    return state


def data_wait_note(share: float, workers: int) -> str:
    return (f"note: {share:.0%} of this epoch waited for the data loader ({workers} workers): the model could train "
            f"faster than images arrive. More data.num_workers, a larger data.cache_mb (classification keeps decoded "
            f"images in memory), or a smaller data.image_size would feed it faster")


def epoch_metrics(history_entry: dict) -> dict[str, float]:
    """What is logged at the end of an epoch, from its entry in FitState.history."""
    return {k: v for k, v in history_entry.items() if k != "steps_per_epoch"}


def _eta(state: FitState, epochs: int) -> str:
    times = [h.get("epoch_time", 0.0) for h in state.history]
    left = (epochs - state.epoch) * (sum(times) / max(1, len(times)))
    return f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f}s"


def _unfreeze(f: Fit, epoch: int, step: int) -> None:
    stages = f.plan.unfreezing_at(epoch)
    if not stages:
        return
    model = distributed.unwrap(f.model)
    finetune.apply(model, f.plan, epoch)
    factor = f.schedule.factor(step)
    for group in finetune.param_groups(model, f.plan, f.base_lr, f.weight_decay, epoch=epoch, only=stages):
        group["lr"] = group["base_lr"] * factor
        f.optimizer.add_param_group(group)
    log.info(f"epoch {epoch}: unfreezing {', '.join(stages)}")
    f.log({f"unfreeze/{s}": 1.0 for s in stages}, epoch)


def _save(f: Fit, state: FitState, best: bool) -> None:
    if not f.settings.ctx.main:
        return  # one writer: rank 0's weights are every rank's weights
    model_state = distributed.unwrap(f.model).state_dict()
    ckpt = {
        "model": model_state,
        "optimizer": f.optimizer.state_dict(),
        "scaler": f.scaler.state_dict() if f.scaler is not None else None,
        "fit": state.as_dict(),
        "rng": checkpoint.rng_state(),
        **({"ema": f.ema.state_dict()} if f.ema else {}),
        **f.extra,
    }
    checkpoint.save_last(ckpt, f.output_dir, f.keep_checkpoints)
    if best:  # weights only: the optimizer state (twice the model's size with AdamW) is for resuming, from last.pt
        counted = f.ema.module.state_dict() if f.ema else model_state  # the model evaluated is the model kept
        checkpoint.save({"model": counted, "fit": state.as_dict(), **f.extra}, f.output_dir / checkpoint.BEST)
