"""The segmentation task's config sections (light: pydantic only, so reading a task file stays fast)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config.sections import DataConfig, ModelConfig, TaskConfig
from pipeline.tasks.metric import Metric

# mean IoU over the classes present: picks the best checkpoint (pipeline/tasks/metric.py)
PRIMARY = Metric("val/mIoU", perfect=1.0)


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
    flip_tta: ClassVar[bool] = True  # a mirrored image's mask, mirrored back: eval.tta, predict --tta

    task: Literal["segmentation"]
    data: SegmentationData = SegmentationData()
    model: SegmentationModel = SegmentationModel()

    @model_validator(mode="after")
    def _check_batch(self) -> Config:
        # ASPP's image-pooling branch runs BatchNorm on one value per channel and image: training needs two images.
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be at least 2 for DeepLabV3 (its ASPP pooling BatchNorm)")
        return self
