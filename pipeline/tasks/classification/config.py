"""The classification task's config sections (light: pydantic only, so reading a task file stays fast)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pipeline.config.sections import DataConfig, ModelConfig, TaskConfig
from pipeline.tasks.metric import Metric

PRIMARY = Metric("val/top1", perfect=1.0)  # top-1 accuracy on the validation set: picks the best checkpoint


class ClassificationData(DataConfig):
    format: Literal["imagefolder", "cifar10", "cifar100"] = "imagefolder"
    # With one folder of classes (no train/ and val/), hold out this stratified fraction for validation.
    val_fraction: float = Field(0.0, ge=0, lt=1)
    download: bool = False
    # Decoded ImageFolder images kept in memory, per split and loader process, up to this many MiB: later epochs
    # neither read nor decode them. 0 decodes every time.
    cache_mb: int = Field(512, ge=0)
    # Rare classes: sampler draws training images class-balanced, with replacement, as many per epoch as there are;
    # loss weights each class's loss by its inverse frequency (pipeline/tasks/classification/balance.py says why).
    balance: Literal["none", "sampler", "loss"] = "none"


class ClassificationModel(ModelConfig):
    dropout: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Config(TaskConfig):
    mixes_labels: ClassVar[bool] = True  # one label per image: train.mixup / train.cutmix blend them
    flip_tta: ClassVar[bool] = True  # a mirrored image is the same class: eval.tta, predict --tta

    task: Literal["classification"]
    data: ClassificationData = ClassificationData()
    model: ClassificationModel = ClassificationModel()
