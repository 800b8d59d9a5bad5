"""What a run records about itself besides its metrics: the model's tags and cost (depth, parameters, GFLOPs) for
depth comparisons, the datasets it read as MLflow dataset inputs, and the closing summary table."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline import tracking
from pipeline.data import fingerprint
from pipeline.data.dataset import TaskDataset
from pipeline.models import backbones, profile
from pipeline.tasks.base import DataInfo
from pipeline.train import finetune


def model_tags(model: nn.Module, info: DataInfo, plan: finetune.Plan, image_size: int, device: torch.device,
               precision: str) -> dict[str, str]:
    frozen = [s for s in plan.parts if s in plan.frozen]
    lineage = model.backbone.lineage  # stale when a task's own init (coco) replaced the backbone's weights
    # gflops: multiply-accumulates per image at the task's input size (see profile.gflops), for depth comparisons
    return {**(lineage.tags() if lineage.source == model.backbone.weights else {}),
            "num_params": str(profile.num_params(model)),
            "gflops": f"{profile.gflops(model, image_size):.4f}",
            "trainable_params": str(finetune.trainable_params(model)), "frozen_stages": ",".join(frozen) or "none",
            "num_classes": str(info.num_classes), "weights": model.backbone.weights, "device": str(device),
            "precision": precision}


def model_metrics(backbone: str, described: dict[str, str]) -> dict[str, float]:
    """The model's cost from `model_tags` as numbers, for chart axes: depth, parameters, GFLOPs at the task's size."""
    depth = backbones.depth(backbone)
    return {**({"model/depth": float(depth)} if depth else {}), "model/num_params": float(described["num_params"]),
            "model/gflops": float(described["gflops"])}


def dataset_records(data_root: str, train: TaskDataset, val: TaskDataset) -> list[tracking.DatasetRecord]:
    """The train and val sets as the run's MLflow dataset inputs: named after the data root's last two folders
    (`shapes/classification train`), with a digest of the files each split reads (pipeline/data/fingerprint.py)."""
    root = Path(os.path.abspath(data_root))  # as the datasets' own paths are joined: no symlinks resolved
    return [tracking.DatasetRecord(name=f"{'/'.join(root.parts[-2:])} {split}",
                                   digest=fingerprint.digest(dataset.files(), root, len(dataset)), source=str(root),
                                   context=context, rows=len(dataset))
            for split, context, dataset in (("train", "training", train), ("val", "validation", val))]


def summary(history: list[dict], best_epoch: int, metrics: dict, primary: str) -> str:
    """A row per epoch (train loss, the primary metric, img/s, time), then the best epoch's validation metrics."""
    rows = [("epoch", "train loss", primary, "img/s", "time")]
    for i, h in enumerate(history, start=1):
        rows.append((str(i), f"{h.get('train/loss_epoch', float('nan')):.4f}", f"{h.get(primary, float('nan')):.4f}",
                     f"{h.get('train/throughput', 0):.0f}", f"{h.get('epoch_time', 0):.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    extras = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                       if k.startswith("val/") and k.count("/") == 1 and isinstance(v, float))
    return "\n".join(lines + [f"best epoch {best_epoch}: {extras}"])
