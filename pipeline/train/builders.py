"""The runner's public builders, one step each: data, model, fine-tuning plan, placement, loaders, optimizer, the fit
(the learning rate between loaders and optimizer, with train.lr: auto, is pipeline/train/lr_find.py).

Each gets the `Setup` a run decided before reading any data (pipeline/train/runner.py makes it) and returns what the
next step needs; predict, export, the benchmarks and the tests call them rather than copying their steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline import config, tracking
from pipeline.data import loading, shapes, transform_checks
from pipeline.data.sampling import SeededDataset, training_sampler
from pipeline.data.transforms import reseed_worker
from pipeline.errors import UserError
from pipeline.models import backbones, tracked
from pipeline.platform import cpu_kernels, threads
from pipeline.tasks.base import DataInfo, Task, TaskData
from pipeline.tasks.metric import Metric
from pipeline.tasks.tta import flip_averaged_predict
from pipeline.train import checkpoint, distributed, engine, feature_cache, finetune, optim
from pipeline.train.ema import EMA

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What a run decided before reading any data: its validated config, task, folders, device and precision."""

    cfg: config.TaskConfig
    task: Task
    primary: Metric  # the task's, as its registry entry declares it
    task_file: str
    experiment: str
    output_dir: Path
    last: dict | None  # the checkpoint to resume from
    device: torch.device
    precision: str
    ctx: distributed.Context
    threads: threads.Governor | None = None  # intra-op CPU threads, chosen and kept up to date (prepare)


# ---------------------------------------------------------------------------------------------------------------------
# data and model


def build_data(setup: Setup) -> TaskData:
    """The task's datasets; its synthetic data is generated first where the config asks for it. The transforms are
    checked before anything trains (pipeline/data/transform_checks.py): validation that would corrupt the metric is
    refused before any data is read, train and val images of different sizes after the first of each is read."""
    cfg, task = setup.cfg, setup.task
    transform_checks.check_val_spec(task, cfg.data)
    root = Path(cfg.data.root)
    # Only where data.root is the synthetic set's own folder: the quickstart pointed at your images generates nothing.
    if cfg.data.synth_if_missing and root.name == task.synth and setup.ctx.main:
        shapes.ensure(root.parent, task.synth, seed=0)
    distributed.barrier(setup.ctx)
    loading.seed_everything(cfg.seed)
    default_mean, default_std = backbones.pretrained_mean_std(cfg.model.backbone.name)
    data = task.build_data(cfg.data, mean=cfg.data.mean or default_mean, std=cfg.data.std or default_std,
                           seed=cfg.seed)
    transform_checks.check_sizes(task, data.train, data.val, cfg.data, cfg.seed)
    log.info(f"data: {len(data.train)} train / {len(data.val)} val images from {cfg.data.root}")
    return data


def build_model(setup: Setup, info: DataInfo) -> nn.Module:
    """The task's model with its configured weights; a resumed run's weights on top. `runs:/` and `models:/` weights
    come from the run's own tracking store (pipeline/models/tracked.py). What the backbone loaded is printed."""
    cfg = setup.cfg
    weights = cfg.model.backbone.weights
    if tracking.is_tracked(weights):
        with tracked.fetch(weights, tracking.resolve_uri(cfg.tracking.uri), cfg.model.backbone.name) as fetched:
            backbone = cfg.model.backbone.model_copy(update={"weights": str(fetched.path)})
            model = setup.task.build_model(cfg.model.model_copy(update={"backbone": backbone}), info)
            tracked.relabel(model.backbone, fetched)
    else:
        model = setup.task.build_model(cfg.model, info)
    lineage = model.backbone.lineage
    if lineage.loaded and lineage.source == model.backbone.weights:  # not replaced by a task's own init (coco)
        log.info(lineage.line())
    if setup.last:
        model.load_state_dict(setup.last["model"])
    return model


def epochs_done(setup: Setup) -> int:
    return setup.last["fit"]["epoch"] if setup.last else 0


def plan_finetune(setup: Setup, model: nn.Module) -> finetune.Plan:
    """Frozen stages, BatchNorm policy and learning-rate multipliers, applied to the model as of the epochs done."""
    ft = setup.cfg.finetune
    plan = finetune.make_plan(model, freeze=ft.freeze, bn=ft.bn, lr_mult=ft.lr_mult, layer_decay=ft.layer_decay,
                              unfreeze=ft.unfreeze, no_decay_norm_bias=ft.no_decay_norm_bias,
                              epochs=setup.cfg.train.epochs, cache_features=ft.cache_features)
    finetune.apply(model, plan, epochs_done(setup))
    return plan


def place_model(setup: Setup, model: nn.Module, plan: finetune.Plan) -> nn.Module:
    """The model on its device and memory format, with the CPU fast paths (train.cpu_kernels) and torch.compile."""
    t = setup.cfg.train
    if setup.ctx.active:
        _check_data_parallel(plan)
        if t.sync_bn:
            if setup.device.type != "cuda":
                raise UserError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); on CPU set "
                                "train.sync_bn=false, or finetune.bn=frozen for the same result on any split")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(setup.device, memory_format=torch.channels_last if t.channels_last else torch.contiguous_format)
    cpu_kernels.apply(model, setup.device, t.cpu_kernels, compile=t.compile)
    if t.compile:
        model.compile()  # in place: the same module, parameters and state_dict, its calls go through torch.compile
    return model


def make_optimizer(setup: Setup, model: nn.Module, plan: finetune.Plan, tracker=None):
    """SGD or AdamW over the param groups of the stages trainable so far; their table is printed and logged."""
    t = setup.cfg.train
    groups = finetune.groups_until(model, plan, t.lr, t.weight_decay, epochs_done(setup))
    finetune.require_trainable(groups, "finetune")
    optimizer = optimizer_for(setup, groups)
    table = finetune.group_table(groups, plan, model)
    log.info(table)
    if tracker is not None:
        tracker.log_text(table + "\n", "param_groups.txt")
    return optimizer


def optimizer_for(setup: Setup, groups: list[dict]) -> torch.optim.Optimizer:
    """The run's optimizer (train.optimizer with its settings; the CPU fast path) over `groups`, each with its lr."""
    t = setup.cfg.train
    return optim.build_optimizer(groups, t.optimizer, groups[0]["lr"], t.momentum, t.nesterov, t.betas,
                                 dense_adamw=cpu_kernels.enabled(t.cpu_kernels, setup.device))


def batch_mixer(setup: Setup, info: DataInfo):
    """The task's mixer of training batches with train.mixup / train.cutmix (the task's schema allows them), or None."""
    t = setup.cfg.train
    return setup.task.mixer(t.mixup, t.cutmix, info.num_classes, setup.cfg.seed) if t.mixup or t.cutmix else None


# ---------------------------------------------------------------------------------------------------------------------
# loaders and fit


def make_loaders(setup: Setup, data: TaskData, model: nn.Module, plan: finetune.Plan):
    """Train and val loaders; with finetune.cache_features, loaders over the backbone's cached features instead."""
    cfg, task = setup.cfg, setup.task
    train, val = loaders(task, data.train, data.val, cfg.data.batch_size, cfg.data.num_workers, setup.device,
                         cfg.seed, setup.ctx)
    if len(train) == 0:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(data.train)} training "
                        "images; lower it")
    if not plan.cache_features:
        return train, val
    ft = cfg.finetune
    feature_cache.check(task, data.info.random_train_transforms, ft.cached_views)
    started = time.perf_counter()
    train, val = feature_cache.cached_loaders(model, train, val, step_settings(setup), ft.cached_views, cfg.seed,
                                              data.train.sampling_weights)
    model.input_is_features = True
    log.info(f"cached backbone features of {len(train.dataset)} train / {len(val.dataset)} val images in "
        f"{time.perf_counter() - started:.1f}s; the head trains on them")
    return train, val


def step_settings(setup: Setup) -> engine.StepSettings:
    t = setup.cfg.train
    return engine.StepSettings(device=setup.device, precision=setup.precision, channels_last=t.channels_last,
                               accum_steps=t.accum_steps, clip_grad_norm=t.clip_grad_norm, log_every=t.log_every,
                               max_nonfinite=t.max_nonfinite, ctx=setup.ctx, grad_norms=t.log_grad_norms,
                               threads=setup.threads)


def make_fit(setup: Setup, model: nn.Module, info: DataInfo, plan: finetune.Plan, optimizer, train_loader, val_loader,
             tracker) -> engine.Fit:
    """Everything `engine.fit` needs: loaders, optimizer, lr schedule, checkpoint contents, logging."""
    cfg, t, task = setup.cfg, setup.cfg.train, setup.task
    steps_per_epoch = -(-len(train_loader) // t.accum_steps)  # the last, partial accumulation steps too
    schedule = optim.make_schedule(t.schedule, t.epochs, steps_per_epoch, t.warmup_epochs, t.min_lr_ratio,
                                    t.step_milestones, t.step_gamma, t.poly_power)
    on = f"{setup.ctx.world} processes ({setup.device.type}), global batch {cfg.data.batch_size * setup.ctx.world}" \
        if setup.ctx.active else str(setup.device)
    on += setup.threads.summary() if setup.device.type == "cpu" and setup.threads else ""
    layout = ", channels_last" if t.channels_last else ""
    log.info(f"training {cfg.model.backbone.name} on {on} ({setup.precision}{layout})"
        f" for {t.epochs} epochs, {steps_per_epoch} steps each")
    ema = EMA(model, t.ema) if t.ema else None  # of the model itself, before any DDP wrapper
    tracker.set_tags({"evaluated_weights": f"ema {t.ema:g}" if ema else "trained"})
    if ema:
        log.info(f"train.ema={t.ema:g}: {ema.describe()} is evaluated and checkpointed (best.pt)")
    return engine.Fit(
        model=distributed.wrap(setup.ctx, model, setup.device), loss=task.loss, predict=run_predict(setup),
        make_evaluator=lambda: task.make_evaluator(info), primary=setup.primary,
        merge_evaluators=task.merges_evaluators,
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer, schedule=schedule, plan=plan,
        base_lr=t.lr, weight_decay=t.weight_decay, settings=step_settings(setup), epochs=t.epochs,
        output_dir=setup.output_dir, patience=t.patience, keep_checkpoints=t.keep_checkpoints,
        scaler=torch.amp.GradScaler(setup.device.type) if setup.precision == "fp16" else None,
        ema=ema, mix=batch_mixer(setup, info),
        extra={"run_id": tracker.run_id, "config": cfg.model_dump(mode="json"), "info": info.to_dict(),
               "task_file": setup.task_file},
        log=tracker.log_metrics)


def run_predict(setup: Setup):
    """How validation runs the model: the task's `predict`, averaged with the mirrored images' with eval.tta."""
    task = setup.task
    return flip_averaged_predict(task.predict, task.mirror_outputs) if setup.cfg.eval.tta else task.predict


def resumed_state(setup: Setup, fit: engine.Fit, tracker) -> engine.FitState:
    """A new run's empty state, or a resumed run's: optimizer, scaler, RNG and history from its last checkpoint."""
    last = setup.last
    if not last:
        return engine.FitState()
    fit.optimizer.load_state_dict(last["optimizer"])
    if fit.scaler is not None and last.get("scaler"):
        fit.scaler.load_state_dict(last["scaler"])
    if fit.ema is not None and last.get("ema"):
        fit.ema.load_state_dict(last["ema"])
    state = engine.FitState(**last["fit"])
    checkpoint.set_rng_state(last["rng"])
    log.info(f"resuming {setup.output_dir} after epoch {state.epoch} (MLflow run {tracker.run_id})")
    # Epochs checkpointed but killed before their metrics reached MLflow; the tracker skips those it has.
    for epoch, entry in enumerate(state.history, start=1):
        tracker.log_metrics(engine.epoch_metrics(entry), epoch)
    return state


def _check_data_parallel(plan: finetune.Plan) -> None:
    if plan.cache_features:
        raise UserError("finetune.cache_features runs in one process; drop torchrun or set "
                        "finetune.cache_features=false")
    if plan.unfreeze:
        raise UserError("finetune.unfreeze (gradual unfreezing) runs in one process: DistributedDataParallel cannot "
                        "add parameters mid-run; drop torchrun or the unfreeze schedule")


def loaders(task: Task, train_ds, val_ds, batch_size: int, num_workers, device: torch.device, seed: int,
            ctx: distributed.Context = distributed.Context()) -> tuple[DataLoader, DataLoader]:
    workers = loading.auto_workers(device) if num_workers == "auto" else num_workers
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
              "worker_init_fn": reseed_worker, "collate_fn": task.collate_fn}
    # Order and augmentation are functions of (seed, epoch, index): see pipeline/data/sampling.py. With data.balance
    # the dataset's sampling weights draw rare classes more often, and the epoch keeps its length.
    order = training_sampler(len(train_ds), train_ds.sampling_weights, seed, rank=ctx.rank, world=ctx.world)
    sampler = task.batch_sampler(train_ds, order, batch_size)
    train = DataLoader(SeededDataset(train_ds), batch_size=batch_size, sampler=sampler,
                       drop_last=len(train_ds) > batch_size, generator=torch.Generator().manual_seed(seed), **common)
    # Evaluators that merge let each rank score a shard of the validation set (see engine.evaluate).
    shard = ctx.active and task.merges_evaluators
    val = DataLoader(Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world)) if shard else val_ds,
                     batch_size=batch_size, shuffle=False, **common)
    return train, val
