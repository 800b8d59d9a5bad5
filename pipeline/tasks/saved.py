"""A trained model from the checkpoint a run wrote (`best.pt`, `last.pt`): its config, what its data said, and the
task's model holding the checkpoint's weights. Predict, export, serving and galleries (pipeline/use/) read trained
models through here; so does anything else that opens a run's checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline import config
from pipeline.errors import UserError
from pipeline.platform import cpu_kernels
from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo, Task


@dataclass
class Saved:
    """A trained model in eval mode on the CPU, with what it was trained with."""

    task: Task
    model: nn.Module
    cfg: config.TaskConfig
    info: DataInfo  # what the data said, saved in the checkpoint (classes, the task's facts)
    run_id: str | None  # the MLflow run that trained it, as the checkpoint records
    fit: dict = field(default_factory=dict)  # the checkpoint's training state: per-epoch `history`, `best_epoch`


def read(ckpt: dict, source: str) -> Saved:
    """The task's model rebuilt from `ckpt` (a loaded checkpoint dict; `source` names it in errors): random init, so
    no weights are downloaded, then the checkpoint's weights."""
    if not isinstance(ckpt, dict) or not {"model", "config", "info"} <= set(ckpt):
        raise UserError(f"'{source}' is not a checkpoint of this pipeline (no model, config and info inside); "
                        "give a best.pt / last.pt written by 'pipeline run'")
    cfg = config.validate(ckpt["config"], source=f"config saved in {source}")
    task = registry.get(cfg.task)
    info = task.read_info(ckpt["info"])
    backbone = cfg.model.backbone.model_copy(update={"weights": "none", "fallback_to_random": False})
    model = task.build_model(cfg.model.model_copy(update={"backbone": backbone}), info)
    model.load_state_dict(ckpt["model"])
    return Saved(task, model.eval(), cfg, info, ckpt.get("run_id"), ckpt.get("fit", {}))


def inference_ready(model: nn.Module) -> nn.Module:
    """A model trained in this process as inference and export want it: stock operations (cpu_kernels.restore) and no
    grad switching of frozen stages (an exporter would record it). A rebuilt model (`read`) is so already."""
    model.backbone.no_grad_stages = 0
    cpu_kernels.restore(model)
    return model
