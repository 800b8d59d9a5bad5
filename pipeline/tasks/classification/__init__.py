"""Image classification: backbone -> global average pool -> dropout -> linear head; top-1 / top-5 / loss metrics."""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline import backbones
from pipeline.config import DataConfig, ModelConfig, TaskConfig
from pipeline.data.transforms import build_transforms, is_random
from pipeline.tasks.classification.data import build_datasets
from pipeline.tasks.classification.report import confusion_figure, per_class_table


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


PRIMARY = "val/top1"
SYNTH = "classification"  # the synthetic shapes dataset for data.synth_if_missing
LOG_FORMAT = "pt2"  # how tracking.log_model serialises inference_module(model)
MAX_PER_CLASS_METRICS = 50


def _metric_name(name: str) -> str:
    # MLflow metric keys allow letters, digits and _ - . / and spaces.
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name)


def default_transforms(image_size: int) -> tuple[list[dict], list[dict]]:
    train = [{"name": "RandomResizedCrop", "size": [image_size, image_size], "scale": [0.35, 1.0]},
             {"name": "HorizontalFlip", "p": 0.5}]
    val = [{"name": "SmallestMaxSize", "max_size": round(image_size / 0.875)},
           {"name": "CenterCrop", "height": image_size, "width": image_size}]
    return train, val


def build_data(data: ClassificationData, *, mean, std, seed: int):
    train_spec, val_spec = default_transforms(data.image_size)
    train_spec = data.train_transforms if data.train_transforms is not None else train_spec
    val_spec = data.val_transforms if data.val_transforms is not None else val_spec
    train_tf = build_transforms(train_spec, field="data.train_transforms", mean=mean, std=std, seed=seed)
    val_tf = build_transforms(val_spec, field="data.val_transforms", mean=mean, std=std, seed=seed)
    train_ds, val_ds, classes = build_datasets(
        Path(data.root), data.format, val_fraction=data.val_fraction, seed=seed, train_transform=train_tf,
        val_transform=val_tf, skip_bad_images=data.skip_bad_images, download=data.download,
        cache_bytes=data.cache_mb << 20)
    info = {"classes": list(classes), "num_classes": len(classes), "train_size": len(train_ds),
            "val_size": len(val_ds), "random_train_transforms": is_random(train_spec)}
    return train_ds, val_ds, info


class Classifier(nn.Module):
    def __init__(self, backbone: backbones.Backbone, num_classes: int, dropout: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes))
        self.label_smoothing = label_smoothing
        # Set while training on cached backbone features: forward() then receives pooled features, not images.
        self.input_is_features = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        last = self.backbone(images)[self.backbone.out_stages[-1]]
        return last.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x if self.input_is_features else self.features(x))

    def head_parts(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(head=self.head)


def build_model(model: ClassificationModel, info: dict, say=print) -> Classifier:
    b = model.backbone
    backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random, say=say)
    return Classifier(backbone, info["num_classes"], model.dropout, model.label_smoothing)


def loss(model: Classifier, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return {"cls": F.cross_entropy(logits.float(), labels, label_smoothing=model.label_smoothing)}


def predict(model: Classifier, batch) -> torch.Tensor:
    return model(batch[0])


def inference_module(model: Classifier) -> nn.Module:
    """What MLflow logs: images in, one tensor (logits) out."""
    return model


def example_input(image_size: int) -> torch.Tensor:
    # Two images: torch.export (MLflow's pt2 format) would fix a batch of one as the only allowed size.
    return torch.zeros(2, 3, image_size, image_size)


class Evaluator:
    """Top-1, top-5, mean loss and per-class accuracy from a confusion matrix accumulated on the device."""

    primary = PRIMARY

    def __init__(self, num_classes: int, classes: list[str] | None = None):
        self.num_classes = num_classes
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.confusion: torch.Tensor | None = None
        self.top5 = self.loss = 0.0
        self.count = 0
        self._top5 = self._loss = None

    def update(self, logits: torch.Tensor, batch) -> None:
        labels = batch[1]
        logits = logits.float()
        if self.confusion is None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=logits.device)
            self._top5 = torch.zeros((), device=logits.device)
            self._loss = torch.zeros((), device=logits.device)
        pred = logits.argmax(1)
        self.confusion += torch.bincount(labels * self.num_classes + pred,
                                         minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)
        k = min(5, self.num_classes)
        self._top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        self._loss += F.cross_entropy(logits, labels, reduction="sum")
        self.count += len(labels)

    def merge(self, other: Evaluator) -> None:
        """Add another rank's counts (data-parallel evaluation on shards of the validation set)."""
        if other.confusion is None:
            return
        if self.confusion is None:
            self.confusion, self._top5, self._loss = other.confusion, other._top5, other._loss
        else:
            device = self.confusion.device
            self.confusion += other.confusion.to(device)
            self._top5 += other._top5.to(device)
            self._loss += other._loss.to(device)
        self.count += other.count

    def compute(self) -> dict:
        if self.confusion is None or self.count == 0:
            return {PRIMARY: 0.0, "val/top5": 0.0, "val/loss": float("nan")}
        cm = self.confusion.cpu()
        per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
        out = {PRIMARY: cm.diag().sum().item() / self.count, "val/top5": self._top5.item() / self.count,
               "val/loss": self._loss.item() / self.count, "val/mean_class_acc": sum(per_class) / len(per_class),
               "confusion": cm.numpy(), "per_class": dict(zip(self.classes, per_class))}
        if self.num_classes <= MAX_PER_CLASS_METRICS:  # beyond that, the per-class CSV artifact is more readable
            out.update({f"val/acc/{_metric_name(c)}": acc for c, acc in zip(self.classes, per_class)})
        return out


def make_evaluator(info: dict) -> Evaluator:
    return Evaluator(info["num_classes"], info["classes"])


def report(metrics: dict, info: dict, out_dir: Path) -> list[Path]:
    """Artifacts people would rather see than read: the confusion matrix plot and a per-class accuracy table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_path = out_dir / "confusion_matrix.png"
    fig = confusion_figure(metrics["confusion"], info["classes"])
    fig.savefig(fig_path, dpi=110, bbox_inches="tight")
    plt.close(fig)  # pyplot keeps every figure alive until closed
    table_path = out_dir / "per_class_accuracy.csv"
    table_path.write_text(per_class_table(metrics["confusion"], info["classes"]))
    return [fig_path, table_path]
