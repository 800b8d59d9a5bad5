"""Object detection: Faster R-CNN with an FPN on the backbone's stages, COCO-format data, COCO box mAP."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import albumentations as A
import matplotlib.pyplot as plt
import torch
from pydantic import Field, field_validator
from torch import nn

from pipeline import backbones
from pipeline.config import DataConfig, ModelConfig, TaskConfig
from pipeline.data.transforms import build_transforms, is_random
from pipeline.errors import UserError
from pipeline.tasks.detection.data import CocoDetection, drop_unreadable, read_coco, select_images
from pipeline.tasks.detection.evaluate import PRIMARY, Evaluator  # noqa: F401 (PRIMARY: part of the task contract)
from pipeline.tasks.detection.model import Detector, build_detector, frozen_bn, load_coco
from pipeline.tasks.detection.report import boxes_figure, per_class_table, write_results


class DetectionData(DataConfig):
    root: str = "data/shapes/coco"
    # Relative to root (or absolute): COCO 2017 is annotations/instances_train2017.json with images in train2017/.
    train_ann: str = "annotations/train.json"
    val_ann: str = "annotations/val.json"
    train_images: str = "images/train"
    val_images: str = "images/val"
    # Training images without boxes: negatives (true) or left out (false). Validation always keeps every image.
    keep_empty: bool = True
    # Batch landscape and portrait images apart, so padding to the largest image of a batch wastes little.
    group_aspect_ratio: bool = False


class DetectionModel(ModelConfig):
    # backbone: model.backbone.weights (ImageNet by default); coco: torchvision's COCO-trained detector
    # (fasterrcnn_resnet50_fpn, or _v2 with version v2), all but the class-specific box predictor.
    init: Literal["backbone", "coco"] = "backbone"
    # v1: torchvision's original heads; v2: BatchNorm in the FPN and heads, 2-conv RPN head, 4-conv box head.
    version: Literal["v1", "v2"] = "v1"
    # FrozenBatchNorm2d in the backbone (statistics and affine fixed), as torchvision does for pretrained detection
    # backbones; a random-init backbone needs trainable BatchNorm (false).
    frozen_bn: bool = True
    fpn_stages: list[str] | None = None  # None: the last four stages (layer1..layer4)
    fpn_channels: int = Field(256, gt=0)
    # Images are resized so the short side is min_size (one of the list, at random, in training) and the long side at
    # most max_size.
    min_size: int | list[int] = 800
    max_size: int = Field(1333, gt=0)
    anchor_sizes: list[int] = [32, 64, 128, 256, 512]  # one per pyramid level, the extra pooled level last
    aspect_ratios: list[float] = [0.5, 1.0, 2.0]
    rpn_batch_size_per_image: int = Field(256, gt=0)
    rpn_pre_nms_top_n_train: int = Field(2000, gt=0)
    rpn_post_nms_top_n_train: int = Field(2000, gt=0)
    rpn_pre_nms_top_n_test: int = Field(1000, gt=0)
    rpn_post_nms_top_n_test: int = Field(1000, gt=0)
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    box_batch_size_per_image: int = Field(512, gt=0)  # RoIs sampled per image for the box head's loss
    box_positive_fraction: float = Field(0.25, gt=0, le=1)
    roi_output_size: int = Field(7, gt=0)
    representation_size: int = Field(1024, gt=0)
    box_score_thresh: float = Field(0.05, ge=0, lt=1)
    box_nms_thresh: float = Field(0.5, gt=0, le=1)
    box_detections_per_img: int = Field(100, gt=0)

    @field_validator("min_size", "anchor_sizes", "aspect_ratios")
    @classmethod
    def _positive(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values):
            raise ValueError("must be positive (a non-empty list of positive numbers)")
        return value


class Config(TaskConfig):
    task: Literal["detection"]
    data: DetectionData = DetectionData()
    model: DetectionModel = DetectionModel()


SYNTH = "coco"  # the synthetic shapes scenes, for data.synth_if_missing
LOG_FORMAT = "pickle"  # torch.export cannot trace the data-dependent proposal and NMS steps


def default_transforms() -> tuple[list[dict], list[dict]]:
    # The detector resizes to model.min_size / max_size itself; the data side only augments.
    return [{"name": "HorizontalFlip", "p": 0.5}], []


def build_data(data: DetectionData, *, mean, std, seed: int):
    root = Path(data.root)
    train_spec, val_spec = default_transforms()
    train_spec = data.train_transforms if data.train_transforms is not None else train_spec
    val_spec = data.val_transforms if data.val_transforms is not None else val_spec
    # Boxes follow every geometric transform; one that leaves less than a pixel of a box drops the box.
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_width=1, min_height=1, clip=True)
    # (An empty spec gets no bbox processor: albumentations warns about one with nothing to process.)
    train_tf = build_transforms(train_spec, field="data.train_transforms", mean=mean, std=std,
                                bbox_params=bbox_params if train_spec else None, seed=seed)
    val_tf = build_transforms(val_spec, field="data.val_transforms", mean=mean, std=std,
                              bbox_params=bbox_params if val_spec else None, seed=seed)
    train = read_coco(root / data.train_ann, root / data.train_images, "data.train_ann")
    val = read_coco(root / data.val_ann, root / data.val_images, "data.val_ann")
    if val.category_ids != train.category_ids:
        raise UserError(f"data.val_ann: its categories (ids {val.category_ids}) differ from data.train_ann's "
                        f"({train.category_ids}); both files need the same 'categories' list")
    train_records, val_records = train.images, val.images
    if data.skip_bad_images:
        train_records = drop_unreadable(train_records, "data.train_ann")
        val_records = drop_unreadable(val_records, "data.val_ann")
    if not any((~rec.crowd).any() for rec in val_records):
        raise UserError(f"data.val_ann: '{root / data.val_ann}' has no usable box, so mAP is undefined; "
                        "annotate the validation images")
    train_ds = CocoDetection(select_images(train_records, data.keep_empty, "data.train_ann"), train_tf,
                             group_aspect_ratio=data.group_aspect_ratio)
    val_ds = CocoDetection(val_records, val_tf)
    info = {"classes": train.classes, "category_ids": train.category_ids, "num_classes": len(train.classes),
            "train_size": len(train_ds), "val_size": len(val_ds), "mean": list(mean), "std": list(std),
            "random_train_transforms": is_random(train_spec)}
    return train_ds, val_ds, info


def build_model(model: DetectionModel, info: dict, say=print) -> Detector:
    b = model.backbone
    if model.init == "coco":
        if b.name != "resnet50":
            raise UserError(f"model.init: coco loads torchvision's COCO-trained ResNet-50 FPN detector, so it needs "
                            f"model.backbone.name=resnet50 (got {b.name}); use model.init: backbone for {b.name}")
        backbone = backbones.build(b.name, "none")  # the detector's weights replace the backbone's
    else:
        backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random, say=say)
        if model.frozen_bn and backbone.weights == "none":
            say("note: model.frozen_bn with a random-init backbone leaves it without normalisation; "
                "set model.frozen_bn: false to train its BatchNorm")
    if model.frozen_bn:
        backbone = frozen_bn(backbone)
    knobs = model.model_dump(exclude={"backbone", "init", "frozen_bn"})
    detector = build_detector(backbone, info["category_ids"], **knobs)
    if model.init == "coco":
        load_coco(detector, model.version)
        detector.backbone.weights = f"coco ({'fasterrcnn_resnet50_fpn' + ('_v2' if model.version == 'v2' else '')})"
    return detector


def loss(model: Detector, batch) -> dict[str, torch.Tensor]:
    images, targets = batch
    return model(images, targets)


def predict(model: Detector, batch) -> list[dict[str, torch.Tensor]]:
    return model(batch[0])


def make_evaluator(info: dict) -> Evaluator:
    return Evaluator(info["classes"], info["category_ids"], tuple(info["mean"]), tuple(info["std"]))


def report(metrics: dict, info: dict, out_dir: Path) -> list[Path]:
    """The validation predictions (COCO results json), per-class AP table and a picture of predicted and true boxes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = write_results(metrics["results"], out_dir / "val_predictions.json")
    table = out_dir / "per_class_ap.csv"
    table.write_text(per_class_table(metrics["per_class"], info["category_ids"]))
    picture = out_dir / "val_boxes.png"
    fig = boxes_figure(metrics["samples"], info["classes"])
    fig.savefig(picture, dpi=110, bbox_inches="tight")
    plt.close(fig)  # pyplot keeps every figure alive until closed
    return [results, table, picture]


class BoxesOut(nn.Module):
    """What MLflow logs: a normalised image batch in, one tensor out, (N, detections_per_img, 6) rows of
    (x1, y1, x2, y2, score, category_id) in the input's pixels and the dataset's category ids; unused rows are 0
    with category -1."""

    def __init__(self, detector: Detector, category_ids: list[int]) -> None:
        super().__init__()
        self.detector = detector
        self.register_buffer("category_ids", torch.tensor(category_ids, dtype=torch.float32))
        self.rows = detector.roi_heads.detections_per_img

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        detections = self.detector(list(images))
        out = images.new_zeros(len(detections), self.rows, 6)
        out[:, :, 5] = -1
        for i, d in enumerate(detections):
            n = len(d["boxes"])
            out[i, :n, :4] = d["boxes"]
            out[i, :n, 4] = d["scores"]
            out[i, :n, 5] = self.category_ids[d["labels"] - 1]
        return out


def inference_module(model: Detector) -> nn.Module:
    return BoxesOut(model, model.category_ids)


def example_input(image_size: int) -> torch.Tensor:
    return torch.zeros(2, 3, image_size, image_size)
