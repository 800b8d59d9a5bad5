"""The stage runner: prepare -> data -> model -> finetune -> fit -> evaluate -> export.

Each stage gets the few config fields it needs. The MLflow run opens right after the config is validated, so any
later failure marks it FAILED (Ctrl-C: KILLED) with the reason as a tag; checkpoints written so far stay on disk.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline import (allocator, backbones, checkpoint, config, distributed, engine, feature_cache, finetune, outbox,
                      profile, small_conv, tracking)
from pipeline.data import shapes
from pipeline.data.sampling import EpochSampler, SeededDataset
from pipeline.data.transforms import reseed_worker
from pipeline.errors import UserError
from pipeline.tasks import TASKS


@dataclass
class RunResult:
    run_id: str
    output_dir: Path
    best: float
    primary: str
    metrics: dict
    wall_time: float


def run(task_file: str | Path, overrides: tuple[str, ...] = (), resume: bool = False, say=print,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> RunResult:
    """Run one task file. A sweep passes `parent_run_id` (the run nests under it) and `tags` (its swept values)."""
    allocator.keep_freed_memory()  # a training process reuses its memory every step; don't fault it back in
    ctx = distributed.init()  # one process unless started by torchrun
    try:
        return _process(ctx, task_file, overrides, resume, say if ctx.main else _silent, parent_run_id, tags)
    finally:
        distributed.shutdown(ctx)


def _silent(*_) -> None:
    """`say` of ranks other than 0: one voice on the console."""


def _process(ctx: distributed.Context, task_file, overrides, resume, say, parent_run_id, tags) -> RunResult:
    started = time.perf_counter()
    # 1. prepare: config, output folder, tracking store
    cfg = config.load(task_file, overrides)
    task = TASKS[cfg.task]
    experiment = cfg.tracking.experiment or Path(task_file).stem
    backbone_name = cfg.model.backbone.name
    output_dir = Path(cfg.train.output_dir or f"outputs/{experiment}/{backbone_name}")
    last = checkpoint.load_resumable(output_dir, say) if resume else None
    uri = tracking.resolve_uri(cfg.tracking.uri)
    backbones.check_name(backbone_name)
    if not ctx.main:  # rank 0 logs for every rank
        tracker = tracking.Silent(distributed.broadcast(ctx, None))
        return _run(cfg, task, task_file, output_dir, tracker, last, say, ctx)
    tracking.check_reachable(uri)
    tracker = tracking.Tracker.start(
        uri, experiment, run_name=f"{backbone_name}-{datetime.now():%Y%m%d-%H%M%S}",
        # depth as a param too: MLflow's parallel-coordinates chart offers params and metrics, not tags
        params={**tracking.flatten(cfg.model_dump(mode="json")), "depth": str(backbones.depth(backbone_name) or "")},
        tags={**_early_tags(cfg, task_file), **(tags or {})},
        run_id=last["run_id"] if last else None, parent_run_id=parent_run_id)
    distributed.broadcast(ctx, tracker.run_id)
    with tracker:  # FAILED / KILLED with the error as a tag on any exception
        result = _run(cfg, task, task_file, output_dir, tracker, last, say, ctx)
    result.wall_time = time.perf_counter() - started
    say(f"done in {result.wall_time:.0f}s: best {result.primary} {result.best:.4f}; checkpoints in {output_dir}/; "
        f"MLflow run {result.run_id} in {uri} ({_view_hint(uri)})")
    return result


def _view_hint(uri: str) -> str:
    return f"open {uri}" if uri.startswith(("http:", "https:")) else f"view: pipeline ui --uri {uri}"


def _run(cfg, task, task_file, output_dir: Path, tracker, last: dict | None, say,
         ctx: distributed.Context) -> RunResult:
    if last is None and (output_dir / checkpoint.LAST).exists():
        say(f"note: {output_dir} holds an earlier run's checkpoints; this run replaces them (--resume continues it)")
    if ctx.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        tracker.keep_offline(output_dir / outbox.NAME, say)  # a server lost mid-run no longer stops training
        (output_dir / "config.yaml").write_text(config.to_yaml(cfg))
        tracker.log_artifact(output_dir / "config.yaml")
    seed_everything(cfg.seed)
    device = distributed.device_for(ctx, engine.resolve_device(cfg.train.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    precision = engine.resolve_precision(cfg.train.precision, device)

    # 2. data
    if cfg.data.synth_if_missing and ctx.main:
        shapes.ensure(Path(cfg.data.root).parent, task.SYNTH, seed=0)
    distributed.barrier(ctx)
    default_mean, default_std = backbones.pretrained_mean_std(cfg.model.backbone.name)
    train_ds, val_ds, info = task.build_data(cfg.data, mean=cfg.data.mean or default_mean,
                                             std=cfg.data.std or default_std, seed=cfg.seed)
    say(f"data: {len(train_ds)} train / {len(val_ds)} val images from {cfg.data.root}")

    # 3. model
    model = task.build_model(cfg.model, info, say=say)
    epoch_done = last["fit"]["epoch"] if last else 0
    if last:
        model.load_state_dict(last["model"])

    # 4. finetune: freezing, BN policy, param groups
    ft = cfg.finetune
    plan = finetune.make_plan(model, freeze=ft.freeze, bn=ft.bn, lr_mult=ft.lr_mult, layer_decay=ft.layer_decay,
                              unfreeze=ft.unfreeze, no_decay_norm_bias=ft.no_decay_norm_bias, epochs=cfg.train.epochs,
                              cache_features=ft.cache_features)
    finetune.apply(model, plan, epoch_done)
    if ctx.active:
        _check_data_parallel(plan)
        if cfg.train.sync_bn:
            if device.type != "cuda":
                raise UserError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); on CPU set "
                                "train.sync_bn=false, or finetune.bn=frozen for the same result on any split")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    if device.type == "cpu" and not cfg.train.compile:
        # Small-map convolutions by GEMM: resnet18 at 64 px trains 1.3x (fp32) to 1.6-1.9x (bf16) faster. torch.compile
        # gets plain convolutions: through small_conv's autograd functions it compiled for over 4 minutes.
        small_conv.convert(model)
    if cfg.train.compile:
        model.compile()  # in place: the same module, parameters and state_dict, its calls go through torch.compile
    groups = finetune.groups_until(model, plan, cfg.train.lr, cfg.train.weight_decay, epoch_done)
    optimizer = engine.build_optimizer(groups, cfg.train.optimizer, cfg.train.lr, cfg.train.momentum,
                                       cfg.train.nesterov, cfg.train.betas)
    table = finetune.group_table(groups, plan, model)
    say(table)
    tracker.log_text(table + "\n", "param_groups.txt")
    tracker.set_tags(_model_tags(model, info, device, precision, plan, cfg.data.image_size))

    # Evaluators that can merge (see distributed.merge_evaluators) let each rank score a shard of the validation set.
    shard_val = hasattr(task.make_evaluator(info), "merge")
    train_loader, val_loader = _loaders(train_ds, val_ds, cfg.data.batch_size, cfg.data.num_workers, device, cfg.seed,
                                        ctx, shard_val)
    if len(train_loader) == 0:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(train_ds)} training images; "
                        f"lower it")
    t = cfg.train
    settings = engine.StepSettings(device=device, precision=precision, channels_last=t.channels_last,
                                   accum_steps=t.accum_steps, clip_grad_norm=t.clip_grad_norm, log_every=t.log_every,
                                   max_nonfinite=t.max_nonfinite, ctx=ctx)
    if plan.cache_features:
        feature_cache.check(model, cfg.task, info.get("random_train_transforms", False), ft.cached_views)
        started = time.perf_counter()
        train_loader, val_loader = feature_cache.cached_loaders(model, train_loader, val_loader, settings,
                                                                ft.cached_views, cfg.seed)
        model.input_is_features = True
        say(f"cached backbone features of {len(train_loader.dataset)} train / {len(val_loader.dataset)} val images "
            f"in {time.perf_counter() - started:.1f}s; the head trains on them")
    steps_per_epoch = -(-len(train_loader) // t.accum_steps)  # the last, partial accumulation steps too
    schedule = engine.make_schedule(t.schedule, t.epochs, steps_per_epoch, t.warmup_epochs, t.min_lr_ratio,
                                    t.step_milestones, t.step_gamma, t.poly_power)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = engine.FitState()
    if last:
        optimizer.load_state_dict(last["optimizer"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        state = engine.FitState(**last["fit"])
        checkpoint.set_rng_state(last["rng"])
        say(f"resuming {output_dir} after epoch {state.epoch} (MLflow run {tracker.run_id})")
        # Epochs checkpointed but killed before their metrics reached MLflow; the tracker skips those it has.
        for epoch, entry in enumerate(state.history, start=1):
            tracker.log_metrics(engine.epoch_metrics(entry), epoch)

    # 5. fit
    fit = engine.Fit(
        model=distributed.wrap(ctx, model, device), loss=task.loss, predict=task.predict, make_evaluator=lambda: task.make_evaluator(info),
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer, schedule=schedule, plan=plan,
        base_lr=t.lr, weight_decay=t.weight_decay,
        settings=settings,
        epochs=t.epochs, output_dir=output_dir, patience=t.patience, scaler=scaler,
        extra={"run_id": tracker.run_id, "config": cfg.model_dump(mode="json"), "info": info,
               "task_file": str(task_file)},
        log=tracker.log_metrics, say=say)
    on = f"{ctx.world} processes ({device.type}), global batch {cfg.data.batch_size * ctx.world}" if ctx.active \
        else str(device)
    say(f"training {cfg.model.backbone.name} on {on} ({precision}{', channels_last' if t.channels_last else ''}) "
        f"for {t.epochs} epochs, {steps_per_epoch} steps each")
    state = engine.fit(fit, state)
    distributed.barrier(ctx)  # rank 0 has written the last checkpoint

    # 6. evaluate the best checkpoint once more, for its report
    best = checkpoint.load(output_dir / checkpoint.BEST)
    model.load_state_dict(best["model"])
    metrics = engine.evaluate(model, task.predict, task.make_evaluator(info), val_loader, fit.settings, desc="best")
    primary = task.PRIMARY
    if not ctx.main:
        return RunResult(run_id=tracker.run_id, output_dir=output_dir, best=metrics[primary], primary=primary,
                         metrics={}, wall_time=0.0)
    tracker.log_metrics({f"best/{primary.split('/', 1)[1]}": metrics[primary], "best/epoch": state.best_epoch},
                        state.epoch)
    for path in task.report(metrics, info, output_dir / "report"):
        tracker.log_artifact(path, "report")

    # 7. export
    if cfg.tracking.log_checkpoint:
        tracker.log_artifact(output_dir / checkpoint.BEST, "checkpoints")
    if plan.cache_features:
        model.input_is_features = False  # the exported model takes images
    # Inference needs no grad switching; torch.export would record it and the logged graph would not load.
    model.backbone.no_grad_stages = 0
    small_conv.restore(model)
    if cfg.tracking.log_model:
        say("logging the model to MLflow ...")
        model.to("cpu", memory_format=torch.contiguous_format).float().eval()
        tracker.log_model(task.inference_module(model), task.example_input(cfg.data.image_size).numpy(),
                          serialization=task.LOG_FORMAT)
    say(_summary(state, metrics, primary))
    return RunResult(run_id=tracker.run_id, output_dir=output_dir, best=metrics[primary], primary=primary,
                     metrics={k: v for k, v in metrics.items() if isinstance(v, float)}, wall_time=0.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_data_parallel(plan: finetune.Plan) -> None:
    if plan.cache_features:
        raise UserError("finetune.cache_features runs in one process; drop torchrun or set "
                        "finetune.cache_features=false")
    if plan.unfreeze:
        raise UserError("finetune.unfreeze (gradual unfreezing) runs in one process: DistributedDataParallel cannot "
                        "add parameters mid-run; drop torchrun or the unfreeze schedule")


def _loaders(train_ds, val_ds, batch_size: int, num_workers, device: torch.device, seed: int,
             ctx: distributed.Context = distributed.Context(), shard_val: bool = False):
    workers = auto_workers(device) if num_workers == "auto" else num_workers
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
              "worker_init_fn": reseed_worker}
    # Order and augmentation are functions of (seed, epoch, index): see pipeline/data/sampling.py.
    sampler = EpochSampler(len(train_ds), seed, rank=ctx.rank, world=ctx.world)
    if hasattr(train_ds, "group_batches"):  # a dataset may reorder it so batches share a trait (detection: aspect)
        sampler = train_ds.group_batches(sampler, batch_size)
    train = DataLoader(SeededDataset(train_ds), batch_size=batch_size, sampler=sampler,
                       drop_last=len(train_ds) > batch_size, generator=torch.Generator().manual_seed(seed),
                       collate_fn=getattr(train_ds, "collate_fn", None), **common)
    # A dataset with a `collate_fn` attribute batches its own way (detection: lists of variable-size images).
    val_part = Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world)) if ctx.active and shard_val else val_ds
    val = DataLoader(val_part, batch_size=batch_size, shuffle=False, collate_fn=getattr(val_ds, "collate_fn", None),
                     **common)
    return train, val


def auto_workers(device: torch.device) -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # On CPU the model needs every core; a worker pays off only with cores to spare.
    if device.type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return min(8, max(1, cores - 1))


def _early_tags(cfg, task_file) -> dict[str, str]:
    name = cfg.model.backbone.name
    d = backbones.depth(name)
    return {"task": cfg.task, "task_file": str(task_file), "backbone": name, "depth": str(d) if d else "",
            "weights": cfg.model.backbone.weights}


def _model_tags(model, info, device, precision, plan, image_size: int) -> dict[str, str]:
    frozen = [s for s in plan.parts if s in plan.frozen]
    # gflops: multiply-accumulates per image at the task's input size (see profile.gflops), for depth comparisons
    return {"num_params": str(profile.num_params(model)), "gflops": f"{profile.gflops(model, image_size):.4f}",
            "trainable_params": str(finetune.trainable_params(model)),
            "frozen_stages": ",".join(frozen) or "none", "num_classes": str(info.get("num_classes", "")),
            "weights": model.backbone.weights, "device": str(device), "precision": precision}


def _summary(state: engine.FitState, metrics: dict, primary: str) -> str:
    rows = [("epoch", "train loss", primary, "img/s", "time")]
    for i, h in enumerate(state.history, start=1):
        rows.append((str(i), f"{h.get('train/loss_epoch', float('nan')):.4f}", f"{h.get(primary, float('nan')):.4f}",
                     f"{h.get('train/throughput', 0):.0f}", f"{h.get('epoch_time', 0):.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    extras = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                       if k.startswith("val/") and k.count("/") == 1 and isinstance(v, float))
    return "\n".join(lines + [f"best epoch {state.best_epoch}: {extras}"])
