"""The learning-rate range test as a stage of a run: `train.lr: auto` (`choose_lr`, between the loaders and the
optimizer) and `pipeline lr-find` (runner.lr_find) both measure from the run's real starting point with
`lr_range_test`; the test itself is pipeline/train/range_test.py.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from pipeline.errors import UserError
from pipeline.train import distributed, finetune, range_test
from pipeline.train.builders import Setup, epochs_done, optimizer_for, step_settings

log = logging.getLogger(__name__)


def choose_lr(setup: Setup, model: nn.Module, plan: finetune.Plan, train_loader, mix: Callable | None,
              tracker) -> float:
    """train.lr; with `auto`, the range test's suggestion (a resumed run's: the one it started with), recorded on the
    run and put into `setup.cfg` for every later builder. Under torchrun rank 0 tests and the others take its answer."""
    t = setup.cfg.train
    if t.lr != "auto":
        return t.lr
    if setup.last:
        lr = setup.last["config"]["train"]["lr"]
        log.info(f"train.lr: auto: {lr:.2e}, the range test's suggestion when this run started")
    else:
        if setup.ctx.active and t.sync_bn:
            raise UserError("train.lr=auto runs the range test on rank 0 alone, which train.sync_bn's BatchNorm cannot "
                            "(it waits for every process); give train.lr (pipeline lr-find without torchrun finds one)")
        lr = None
        if setup.ctx.main:
            curve = lr_range_test(setup, model, plan, train_loader, mix)
            range_test.record(tracker, curve)
            log.info(f"train.lr: auto: the range test {curve.line()}")
            lr = curve.suggestion
        lr = distributed.broadcast(setup.ctx, lr)
    setup.cfg = setup.cfg.model_copy(update={"train": t.model_copy(update={"lr": lr})})
    return lr


def lr_range_test(setup: Setup, model: nn.Module, plan: finetune.Plan, train_loader,
                  mix: Callable | None = None) -> range_test.Curve:
    """The range test from where this run starts: the parts it trains first with their lr multipliers, its optimizer,
    data (balanced, mixed, cached as configured) and precision; the model is left as it was (range_test.measure)."""
    t, ranged = setup.cfg.train, setup.cfg.lr_find
    groups = finetune.groups_until(model, plan, 1.0, t.weight_decay, epochs_done(setup))  # base_lr: the multiplier
    return range_test.measure(model, setup.task.loss, train_loader, groups, lambda gs: optimizer_for(setup, gs),
                              step_settings(setup), setup.precision == "fp16", ranged.start_lr, ranged.end_lr,
                              ranged.steps, ranged.suggest, mix=mix)


def stage_lrs(curve: range_test.Curve, plan: finetune.Plan, epoch: int) -> str:
    """"; with lr_mult: layer4 1.2e-03, ..." for the parts training at `epoch` whose multiplier is not 1."""
    scaled = [s for s in plan.parts if s not in plan.frozen_at(epoch) and plan.lr_mult[s] != 1.0]
    return "; with lr_mult: " + ", ".join(f"{s} {curve.suggestion * plan.lr_mult[s]:.2e}" for s in scaled) \
        if scaled else ""
