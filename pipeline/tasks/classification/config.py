"""The classification task's config sections (light: pydantic only, so reading a task file stays fast)."""
from __future__ import annotations

from typing import Literal

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


class ClassificationModel(ModelConfig):
    dropout: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Config(TaskConfig):
    task: Literal["classification"]
    data: ClassificationData = ClassificationData()
    model: ClassificationModel = ClassificationModel()
