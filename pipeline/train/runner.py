"""The stage runner: `run` chains the public builders (pipeline/train/builders.py), prepare -> preflight -> data ->
model -> finetune -> loaders -> lr (pipeline/train/lr_find.py) -> optimizer -> fit -> finish; `lr_find` chains them as
far as the loaders and runs the learning-rate range test (pipeline/train/range_test.py).

What can be checked before a run exists is checked first (`prepare`, `preflight`: the config, the backbone's name, the
data's folder, the weights), so a mistake there leaves no MLflow run, no experiment and no folder behind. The MLflow run
opens right after, so any later failure marks it FAILED (Ctrl-C: KILLED) with the reason as a tag; checkpoints written
so far stay on disk. Every line said on the console, and MLflow's own messages, go to the run's log file
(`run.log` in its folder), which MLflow's INFO lines reach instead of the console.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from pipeline import config, console, tracking
from pipeline.config import placement
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.models import weights as W
from pipeline.platform import cpu_kernels, devices, threads
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo, PredictOptions
from pipeline.tracking import outbox
from pipeline.train import checkpoint, checks, describe, distributed, engine, range_test
from pipeline.train.builders import (
    Setup,
    batch_mixer,
    build_data,
    build_model,
    epochs_done,
    make_fit,
    make_loaders,
    make_optimizer,
    place_model,
    plan_finetune,
    resumed_state,
)
from pipeline.train.lr_find import choose_lr, lr_range_test, stage_lrs

log = logging.getLogger(__name__)

RUN_LOG = "run.log"  # in the run's folder: what the console showed, and MLflow's own messages


@dataclass
class RunResult:
    run_id: str
    output_dir: Path
    best: float
    primary: str
    metrics: dict
    wall_time: float
    curve: list[float] = dataclasses.field(default_factory=list)  # the primary metric of each epoch
    weights_in_store: bool = False  # the tracking store holds the best weights (logged model or checkpoint)


def run(task_file: str | Path, overrides: tuple[str, ...] = (), resume: bool = False,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> RunResult:
    """Run one task file. A sweep passes `parent_run_id` (the run nests under it) and `tags` (its swept values)."""
    started = time.perf_counter()
    ctx = distributed.init()  # one process unless started by torchrun
    if not ctx.main:
        console.quiet()  # one voice on the console: rank 0's
    tracking.quiet_console()  # MLflow's INFO lines go to the run's log only
    try:
        with console.recording(extra_loggers=tracking.LOGGERS) as recorded:
            setup = prepare(task_file, overrides, resume, ctx)
            preflight(setup)
            tracker = open_run(setup, parent_run_id, tags)
            if ctx.main:
                recorded.to(setup.output_dir / RUN_LOG)
            with tracker:  # FAILED / KILLED with the error as a tag on any exception
                result = _train(setup, tracker)
            result.wall_time = time.perf_counter() - started
            uri = tracking.resolve_uri(setup.cfg.tracking.uri)
            log.info(f"done in {result.wall_time:.0f}s: best {result.primary} {result.best:.4f}; checkpoints in "
                     f"{setup.output_dir}/; MLflow run {result.run_id} in {uri}")
            if ctx.main:  # the other ranks' tracker knows no experiment
                log.info(f"MLflow UI: {tracking.experiment_link(tracking.ui_address(uri), tracker.experiment_id)}"
                         f"{tracking.start_hint(uri)}")
    finally:
        distributed.shutdown(ctx)
    return result


def _train(setup: Setup, tracker) -> RunResult:
    data = build_data(setup)
    tracker.log_datasets(describe.dataset_records(setup.cfg.data.root, data.train, data.val))
    for line in checks.at_start(setup.cfg, setup.task, data, setup.ctx.world):  # settings that waste a run
        log.warning(line)
    model = build_model(setup, data.info)
    plan = plan_finetune(setup, model)
    model = place_model(setup, model, plan)
    described = describe.model_tags(model, data.info, plan, setup.cfg.data.image_size, setup.device, setup.precision)
    tracker.set_tags(described)
    tracker.log_metrics(describe.model_metrics(setup.cfg.model.backbone.name, described), 0)  # charts plot metrics
    train_loader, val_loader = make_loaders(setup, data, model, plan)
    choose_lr(setup, model, plan, train_loader, batch_mixer(setup, data.info), tracker)  # train.lr: auto
    optimizer = make_optimizer(setup, model, plan, tracker)
    fit = make_fit(setup, model, data.info, plan, optimizer, train_loader, val_loader, tracker)
    state = engine.fit(fit, resumed_state(setup, fit, tracker))
    result = finish(setup, fit, state, data.info, tracker)
    if setup.ctx.main:  # a finished run keeps what train.keep_checkpoints says
        keep = setup.cfg.train.keep_checkpoints
        if keep == "none" and not result.weights_in_store:
            keep = "best"
            log.warning(f"train.keep_checkpoints=none, but the tracking store did not get this run's weights; "
                        f"{setup.output_dir / checkpoint.BEST} stays")
        checkpoint.prune(setup.output_dir, keep)
    return result


def lr_find(task_file: str | Path, overrides: tuple[str, ...] = ()) -> range_test.Curve:
    """`pipeline lr-find`: the range test from the run's starting point (data, weights, fine-tuning plan, loaders and
    precision as `run` builds them), logged to an MLflow run of its own in the task's experiment (`lr-find-...`, no
    backbone tag, so compare leaves it out): the suggestion as a param, the curve as metrics and a plot. Nothing is
    trained, and nothing is written to train.output_dir."""
    ctx = distributed.init()
    if ctx.active:
        distributed.shutdown(ctx)
        raise UserError("pipeline lr-find runs in one process; run it without torchrun (train.lr=auto under torchrun "
                        "tests on rank 0 and gives every process its suggestion)")
    tracking.quiet_console()
    setup = prepare(task_file, overrides)
    preflight(setup)
    cfg, uri = setup.cfg, tracking.resolve_uri(setup.cfg.tracking.uri)
    tracking.check_reachable(uri)
    tracker = tracking.Tracker.start(
        uri, setup.experiment, run_name=f"lr-find-{cfg.model.backbone.name}-{datetime.now():%Y%m%d-%H%M%S}",
        params=tracking.flatten(cfg.model_dump(mode="json")),
        tags={"task": cfg.task, "task_file": setup.task_file, "lr_find": "true", "weights": cfg.model.backbone.weights})
    with tracker:
        data = build_data(setup)
        model = build_model(setup, data.info)
        plan = plan_finetune(setup, model)
        model = place_model(setup, model, plan)
        train_loader, _ = make_loaders(setup, data, model, plan)
        curve = lr_range_test(setup, model, plan, train_loader, batch_mixer(setup, data.info))
        range_test.record(tracker, curve)
    log.info(f"lr-find: {curve.line()}{stage_lrs(curve, plan, epochs_done(setup))}")
    log.info(f"the curve: lr_find/curve.png of MLflow run {tracker.run_id}: "
             f"{tracking.experiment_link(tracking.ui_address(uri), tracker.experiment_id)}{tracking.start_hint(uri)}")
    return curve


# ---------------------------------------------------------------------------------------------------------------------
# 1. prepare and preflight: what a run decides, and what it checks, before it exists


def prepare(task_file: str | Path, overrides=(), resume: bool = False,
            ctx: distributed.Context = distributed.Context()) -> Setup:
    cfg = config.load(task_file, overrides)
    cpu_kernels.prepare_process(cfg.train.cpu_kernels)  # a training process reuses its memory every step
    experiment = placement.experiment(task_file, cfg)  # other data than the task file's: a place of its own
    output_dir = placement.output_dir(cfg, experiment)
    if not cfg.tracking.experiment and experiment != Path(task_file).stem:
        log.info(f"data.root {cfg.data.root} is not {Path(task_file).name}'s own data: experiment '{experiment}', "
                 f"checkpoints in {output_dir} (tracking.experiment and train.output_dir choose others)")
    placement.check_folder(output_dir, cfg.data.root, checkpoints=(checkpoint.LAST, checkpoint.BEST))
    last = checkpoint.load_resumable(output_dir) if resume else None
    backbones.check_name(cfg.model.backbone.name)
    device = distributed.device_for(ctx, devices.resolve_device(cfg.train.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    # CPU threads beside other processes; a GPU run's few CPU threads feed the device, and torch's own count stays
    governor = threads.Governor(cfg.train.threads) if device.type == "cpu" else None
    return Setup(cfg, registry.get(cfg.task), registry.entry(cfg.task).primary, str(task_file), experiment,
                 output_dir, last, device, devices.resolve_precision(cfg.train.precision, device), ctx, governor)


def preflight(setup: Setup) -> None:
    """Refuse, before an MLflow run or a folder exists, what is sure to fail: data that is not there (unless it is
    the synthetic set the run generates) and weights that cannot be had (a missing file; hub weights neither cached nor
    downloadable, which are downloaded now when they can be)."""
    cfg, task = setup.cfg, setup.task
    generated = cfg.data.synth_if_missing and Path(cfg.data.root).name == task.synth
    problem = None if generated else task.missing_data(cfg.data)
    if problem:
        raise UserError(problem)
    b = cfg.model.backbone
    W.check_available(b.name, task.backbone_weights(cfg.model), b.fallback_to_random)


def open_run(setup: Setup, parent_run_id: str | None = None, tags: dict[str, str] | None = None):
    """The MLflow run (rank 0; the other ranks get a `Silent` tracker with its id), with params and early tags, and
    the run's folder with the resolved config."""
    cfg, ctx = setup.cfg, setup.ctx
    if not ctx.main:  # rank 0 logs for every rank
        return tracking.Silent(distributed.broadcast(ctx, None))
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    name = cfg.model.backbone.name
    depth = backbones.depth(name)
    tracker = tracking.Tracker.start(
        uri, setup.experiment, run_name=f"{name}-{datetime.now():%Y%m%d-%H%M%S}",
        # depth as a param too (MLflow's parallel-coordinates chart offers params, not tags); threads: what auto chose
        params={**tracking.flatten(cfg.model_dump(mode="json")), "depth": str(depth or ""),
                "threads": str(torch.get_num_threads())},
        tags={"task": cfg.task, "task_file": setup.task_file, "backbone": name, "depth": str(depth or ""),
              # weights.source as given, before anything can fail; model_tags adds the rest of the lineage
              "weights": cfg.model.backbone.weights, "weights.source": cfg.model.backbone.weights, **(tags or {})},
        run_id=setup.last["run_id"] if setup.last else None, parent_run_id=parent_run_id)
    distributed.broadcast(ctx, tracker.run_id)
    if cfg.tracking.system_metrics_every:
        tracker.log_system_metrics(cfg.tracking.system_metrics_every)
    # what the printed link opens: each run's best score and model cost, by depth (pipeline/tracking/ui.py)
    tracker.set_experiment_tags(tracking.view_tags(ui_metrics(cfg, setup.primary), order_by="model/depth"))
    if setup.last is None and (setup.output_dir / checkpoint.LAST).exists():
        log.info(f"note: {setup.output_dir} holds an earlier run's checkpoints; this run replaces them "
                 "(--resume continues it)")
    setup.output_dir.mkdir(parents=True, exist_ok=True)
    tracker.keep_offline(setup.output_dir / outbox.NAME)  # a server lost mid-run no longer stops training
    (setup.output_dir / "config.yaml").write_text(config.to_yaml(cfg))
    tracker.log_artifact(setup.output_dir / "config.yaml")
    return tracker


def ui_metrics(cfg: config.TaskConfig, primary) -> list[str]:
    """What the MLflow UI opens on (tracking.ui_metrics, else the best primary score and the model's cost)."""
    return cfg.tracking.ui_metrics or [primary.best_key, "model/depth", "model/gflops", "model/num_params",
                                       "train/wall_time_s"]


# ---------------------------------------------------------------------------------------------------------------------
# 2. finish: the best checkpoint's report, the logged model


def finish(setup: Setup, fit: engine.Fit, state: engine.FitState, info: DataInfo, tracker) -> RunResult:
    """Evaluate the best checkpoint once more for its report; log report, checkpoint and model."""
    distributed.barrier(setup.ctx)  # rank 0 has written the last checkpoint
    cfg, task, primary = setup.cfg, setup.task, setup.primary
    model = distributed.unwrap(fit.model)
    model.load_state_dict(checkpoint.load(setup.output_dir / checkpoint.BEST)["model"])
    metrics = engine.evaluate(model, fit.predict, task.make_evaluator(info), fit.val_loader, fit.settings,
                              desc="best", merge=task.merges_evaluators)
    result = RunResult(run_id=tracker.run_id, output_dir=setup.output_dir, best=metrics[primary.name],
                       primary=primary.name, metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
                       wall_time=0.0, curve=[h.get(primary.name, float("nan")) for h in state.history])
    if not setup.ctx.main:
        return result
    # train/wall_time_s: the training passes of every epoch, a resumed run's earlier ones too (not validation)
    tracker.log_metrics({primary.best_key: metrics[primary.name], "best/epoch": state.best_epoch,
                         "train/wall_time_s": sum(h.get("epoch_time", 0.0) for h in state.history)}, state.epoch)
    for path in task.report(metrics, info, setup.output_dir / "report"):
        tracker.log_artifact(path, "report")
    logged = None
    if cfg.tracking.log_model:
        log.info("logging the model to MLflow ...")
        # the served pyfunc rebuilds the model from best.pt (pipeline/use/serve.py): stock modules, any image size
        logged = tracker.log_model(tracking.served_pyfunc(setup.output_dir / checkpoint.BEST, cfg.data.image_size,
                                                          params=dataclasses.asdict(PredictOptions())))
        if cfg.tracking.register and logged:  # not logged: the tracker has said why (server unreachable)
            registered = tracking.register_run(tracking.resolve_uri(cfg.tracking.uri), tracker.run_id,
                                               cfg.tracking.register, {cfg.task: (primary.name, primary.best_key)},
                                               what="tracking.register")
            log.info(registered.line())
    if cfg.tracking.log_checkpoint and not logged:  # the logged model holds best.pt already: one copy per run
        tracker.log_artifact(setup.output_dir / checkpoint.BEST, "checkpoints")
    result.weights_in_store = bool(logged) or (cfg.tracking.log_checkpoint and not tracker.offline)
    log.info(describe.summary(state.history, state.best_epoch, metrics, primary.name))
    return result
