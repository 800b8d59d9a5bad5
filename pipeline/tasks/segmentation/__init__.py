"""Semantic segmentation: DeepLabV3 (ASPP on a dilated backbone, optional aux head); mIoU from a confusion matrix.

Data layouts (VOC, images/ + masks/ folders, COCO json) are in data.py, the model in model.py, the metrics in
metrics.py and the report figures in report.py; this module holds the schema and the task verbs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import DataConfig, ModelConfig, TaskConfig
from pipeline.data.transforms import build_transforms, is_random
from pipeline.errors import UserError
from pipeline.tasks.segmentation import model as M
from pipeline.tasks.segmentation.data import VOC_CLASSES, build_datasets
from pipeline.tasks.segmentation import metrics as seg_metrics
from pipeline.tasks.segmentation.report import iou_bars, overlay_grid, per_class_table, save


class SegmentationData(DataConfig):
    root: str = "data/shapes/coco"
    format: Literal["voc", "folder", "coco"] = "coco"
    # VOC: ImageSets/Segmentation/<split>.txt; folder: images/<split>/; coco: annotations/<split>.json (or
    # instances_<split>.json) with images in images/<split>/ (or <split>/).
    train_split: str = "train"
    val_split: str = "val"
    # Folder format only: class names by mask index, background first (default: classes.txt in data.root).
    classes: list[str] | None = None
    # Mask value that counts nowhere (VOC's object borders), in the loss and in the metrics.
    ignore_index: int = Field(255, ge=0)


class SegmentationModel(ModelConfig):
    output_stride: Literal[8, 16] = 16
    # ASPP dilation rates; None: the paper's (6, 12, 18) at output stride 16, (12, 24, 36) at 8, sized for ~500 px
    # crops. Keep them below the training crop's feature map (crop / output_stride): a larger rate only sees padding
    # in training, and its untrained taps would add noise on bigger evaluation images.
    atrous_rates: tuple[int, int, int] | None = None
    aux_loss: bool = False
    aux_weight: float = Field(0.5, ge=0)
    # backbone: model.backbone.weights for the backbone, fresh heads. coco_voc: torchvision's DeepLabV3 trained on
    # COCO with the VOC classes (resnet50 / resnet101), backbone and heads, new final layers for the dataset.
    init: Literal["backbone", "coco_voc"] = "backbone"
    class_weights: list[float] | None = None


class Config(TaskConfig):
    task: Literal["segmentation"]
    data: SegmentationData = SegmentationData()
    model: SegmentationModel = SegmentationModel()

    @model_validator(mode="after")
    def _check_batch(self) -> Config:
        # ASPP's image-pooling branch runs BatchNorm on one value per channel and image: training needs two images.
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be at least 2 for DeepLabV3 (its ASPP pooling BatchNorm)")
        return self


PRIMARY = seg_metrics.PRIMARY
SYNTH = "coco"  # the synthetic shapes scenes (COCO json + class masks) for data.synth_if_missing
LOG_FORMAT = "pt2"  # how tracking.log_model serialises inference_module(model)


def default_transforms(image_size: int, ignore_index: int) -> tuple[list[dict], list[dict]]:
    """Train: scale to image_size, random rescale 0.5-2x, pad (mask: ignore) and crop, flip. Val: scale and pad.

    Padding keeps the aspect ratio and lets validation batches stack; padded pixels are ignored by loss and metrics.
    """
    pad = {"name": "PadIfNeeded", "min_height": image_size, "min_width": image_size, "border_mode": 0, "fill": 0,
           "fill_mask": ignore_index}
    train = [{"name": "LongestMaxSize", "max_size": image_size},
             {"name": "RandomScale", "scale_limit": [-0.5, 1.0], "p": 1.0},
             pad,
             {"name": "RandomCrop", "height": image_size, "width": image_size},
             {"name": "HorizontalFlip", "p": 0.5}]
    val = [{"name": "LongestMaxSize", "max_size": image_size}, pad]
    return train, val


def build_data(data: SegmentationData, *, mean, std, seed: int):
    if data.skip_bad_images:
        raise UserError("data.skip_bad_images: the segmentation task does not skip files; remove the unreadable "
                        "images (and their masks) and set it to false")
    train_spec, val_spec = default_transforms(data.image_size, data.ignore_index)
    train_spec = data.train_transforms if data.train_transforms is not None else train_spec
    val_spec = data.val_transforms if data.val_transforms is not None else val_spec
    train_tf = build_transforms(train_spec, field="data.train_transforms", mean=mean, std=std, seed=seed)
    val_tf = build_transforms(val_spec, field="data.val_transforms", mean=mean, std=std, seed=seed)
    train_ds, val_ds, classes = build_datasets(
        Path(data.root), data.format, train_split=data.train_split, val_split=data.val_split, classes=data.classes,
        ignore_index=data.ignore_index, train_transform=train_tf, val_transform=val_tf)
    info = {"classes": classes, "num_classes": len(classes), "ignore_index": data.ignore_index,
            "mean": list(mean), "std": list(std), "train_size": len(train_ds), "val_size": len(val_ds),
            "random_train_transforms": is_random(train_spec)}
    return train_ds, val_ds, info


def build_model(model: SegmentationModel, info: dict, say=print) -> M.DeepLabV3:
    b = model.backbone
    voc = [c.lower() for c in info["classes"][1:]] == list(VOC_CLASSES[1:])
    return M.build(b.name, b.weights, b.fallback_to_random, num_classes=info["num_classes"],
                   output_stride=model.output_stride, atrous_rates=model.atrous_rates, aux=model.aux_loss,
                   aux_weight=model.aux_weight, ignore_index=info["ignore_index"], class_weights=model.class_weights,
                   init=model.init, keep_classifier=voc, say=say)


def _cross_entropy(model: M.DeepLabV3, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels, in float32; 0 (not NaN) for a crop that is all ignore."""
    logits = M.upsample(logits, masks.shape[-2:])
    weight = model.class_weights
    total = F.cross_entropy(logits, masks, weight=weight, ignore_index=model.ignore_index, reduction="sum")
    # The denominator of reduction="mean", computed without boolean indexing (no host sync on a GPU).
    valid = masks != model.ignore_index
    count = valid.sum() if weight is None else (weight[masks.masked_fill(~valid, 0)] * valid).sum()
    return total / count.to(total.dtype).clamp(min=1e-12)


def loss(model: M.DeepLabV3, batch) -> dict[str, torch.Tensor]:
    images, masks = batch
    out = model(images)
    losses = {"seg": _cross_entropy(model, out["out"], masks)}
    if "aux" in out:
        losses["aux"] = model.aux_weight * _cross_entropy(model, out["aux"], masks)
    return losses


def predict(model: M.DeepLabV3, batch) -> torch.Tensor:
    """Logits at the masks' resolution, so that scores are computed on the labels as given."""
    images, masks = batch
    return M.upsample(model(images)["out"], masks.shape[-2:])


def inference_module(model: M.DeepLabV3) -> nn.Module:
    return M.Logits(model)


def example_input(image_size: int) -> torch.Tensor:
    # Two images: torch.export (MLflow's pt2 format) would fix a batch of one as the only allowed size.
    return torch.zeros(2, 3, image_size, image_size)


def make_evaluator(info: dict) -> seg_metrics.Evaluator:
    return seg_metrics.Evaluator(info["classes"], info["ignore_index"])


def report(metrics: dict, info: dict, out_dir: Path) -> list[Path]:
    """The overlay grid of validation images, the per-class IoU bar chart and the per-class table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = overlay_grid(metrics["samples"], info["classes"], info["mean"], info["std"], info["ignore_index"])
    table = out_dir / "per_class_iou.csv"
    table.write_text(per_class_table(metrics["confusion"], info["classes"]))
    return [save(grid, out_dir / "overlays.png"), save(iou_bars(metrics["iou"]), out_dir / "per_class_iou.png"), table]
