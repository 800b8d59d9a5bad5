"""The detection task's config sections (light: pydantic only, so reading a task file stays fast)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.config.sections import DataConfig, ModelConfig, TaskConfig
from pipeline.tasks.metric import Metric

PRIMARY = Metric("val/mAP", perfect=1.0)  # COCO box AP@[.5:.95]: picks the best checkpoint (pipeline/tasks/metric.py)


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
    # repeat_factor: LVIS's repeat-factor sampling, images of rare categories drawn more often (pipeline/tasks/
    # detection/balance.py). A category in a fraction f of the training images gets max(1, sqrt(repeat_threshold / f)),
    # an image the largest factor of its categories. LVIS set 0.001 for 1,203 categories over 100k images; on a small
    # custom set a category is rare at a few percent of the images, hence 0.1.
    balance: Literal["none", "repeat_factor"] = "none"
    repeat_threshold: float = Field(0.1, gt=0, le=1)

    @field_validator("balance", mode="before")
    @classmethod
    def _image_level(cls, value: Any) -> Any:
        if value in ("sampler", "loss"):
            raise ValueError(f"{value} balances classification, where each image has one class; a detection image "
                             "holds boxes of several categories: use repeat_factor (LVIS-style image repeats)")
        return value


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
