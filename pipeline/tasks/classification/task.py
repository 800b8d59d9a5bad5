"""The classification task: the contract of pipeline/tasks/base.py for a pooled linear head on the backbone."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import synth
from pipeline.data.sampling import class_balanced
from pipeline.models import backbones
from pipeline.tasks.base import TRAIN_ERROR, DataInfo, ExportSpec, Facts, PredictOptions, Task, TaskData
from pipeline.tasks.classification import balance, cifar, mixing
from pipeline.tasks.classification.config import ClassificationData, ClassificationModel
from pipeline.tasks.classification.data import build_datasets
from pipeline.tasks.classification.evaluate import Evaluator
from pipeline.tasks.classification.report import confusion_figure, per_class_table
from pipeline.tasks.common import save_figure, write_csv


@dataclass
class ClassificationFacts(Facts):
    loss_weights: list[float] | None = None  # per class, with data.balance: loss (balance.py)


class Classifier(nn.Module):
    def __init__(self, backbone: backbones.Backbone, num_classes: int, dropout: float = 0.0,
                 label_smoothing: float = 0.0, class_weights: list[float] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes))
        self.label_smoothing = label_smoothing
        # The loss's class weights (data.balance: loss), on the model's device; not weights of the model: not saved.
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None, persistent=False)
        # Set while training on cached backbone features: forward() then receives pooled features, not images.
        self.input_is_features = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        last = self.backbone(images)[self.backbone.out_stages[-1]]
        return last.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x if self.input_is_features else self.features(x))

    def head_parts(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(head=self.head)


class TopK:
    """`pipeline predict` output: the top-k classes of each image with softmax probabilities, in one CSV."""

    def __init__(self, out_dir: Path, records: Callable[[torch.Tensor], list[dict]]) -> None:
        self.path = out_dir / "predictions.csv"
        self.records = records
        self.rows: list[tuple[str, int, str, str]] = []

    def add(self, paths: list[Path], logits: torch.Tensor) -> None:
        for path, record in zip(paths, self.records(logits)):
            self.rows += [(str(path), rank, top["class"], f"{top['prob']:.6f}")
                          for rank, top in enumerate(record["top_k"], start=1)]

    def finish(self) -> list[Path]:
        return [write_csv(self.path, ["file", "rank", "class", "prob"], self.rows)]


class Classification(Task):
    name = "classification"
    synth = "classification"
    facts = ClassificationFacts
    export = ExportSpec(output_names=("logits",), dynamic_size=True)
    caches_features = True
    merges_evaluators = True
    one_class_per_image = True
    mirror_outputs = staticmethod(lambda logits: logits)  # a mirrored image is of the same class

    def default_transforms(self, data: ClassificationData) -> tuple[list[dict], list[dict]]:
        size = data.image_size
        train = [{"name": "RandomResizedCrop", "size": [size, size], "scale": [0.35, 1.0]},
                 {"name": "HorizontalFlip", "p": 0.5}]
        val = [{"name": "SmallestMaxSize", "max_size": round(size / 0.875)},
               {"name": "CenterCrop", "height": size, "width": size}]
        return train, val

    def missing_data(self, data: ClassificationData) -> str | None:
        if data.format != "imagefolder":
            return None if data.download else cifar.folder_problem(Path(data.root), data.format)
        problem = super().missing_data(data)
        return problem and problem + (" (an ImageFolder: train/<class>/ and val/<class>/ image folders, or one folder "
                                      "of class folders with data.val_fraction)")

    def build_data(self, data: ClassificationData, *, mean, std, seed: int) -> TaskData:
        train_tf, val_tf, random = self.transforms(data, mean=mean, std=std, seed=seed)
        train, val, classes = build_datasets(
            Path(data.root), data.format, val_fraction=data.val_fraction, seed=seed, train_transform=train_tf,
            val_transform=val_tf, skip_bad_images=data.skip_bad_images, download=data.download,
            cache_bytes=data.cache_mb << 20)
        counts = balance.class_counts(train.targets, len(classes))
        if data.balance == "sampler":
            train.sampling_weights = class_balanced(train.targets)
        weights = balance.loss_weights(counts) if data.balance == "loss" else None
        info = DataInfo(classes=list(classes), train_size=len(train), val_size=len(val), mean=tuple(mean),
                        std=tuple(std), image_size=data.image_size, random_train_transforms=random,
                        facts=ClassificationFacts(weights), class_counts=counts)
        return TaskData(train, val, info)

    def build_model(self, model: ClassificationModel, info: DataInfo) -> Classifier:
        b = model.backbone
        backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random)
        return Classifier(backbone, info.num_classes, model.dropout, model.label_smoothing, info.facts.loss_weights)

    def loss(self, model: Classifier, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = model(images)
        # Label smoothing applies to mixed targets alike: smoothing each image's one-hot label and then mixing them,
        # as timm does, gives the same targets as mixing and then smoothing.
        loss = F.cross_entropy(logits.float(), labels, weight=model.class_weights,
                               label_smoothing=model.label_smoothing)
        if labels.ndim == 2:  # mixup / cutmix targets (mixing.py): blended images have no right or wrong class
            return {"cls": loss}
        return {"cls": loss, TRAIN_ERROR: (logits.detach().argmax(1) != labels).float().mean()}

    def mixer(self, mixup: float, cutmix: float, num_classes: int, seed: int) -> mixing.Mixer:
        return mixing.Mixer(mixup, cutmix, num_classes, seed)

    def predict(self, model: Classifier, batch) -> torch.Tensor:
        return model(batch[0])

    def make_evaluator(self, info: DataInfo) -> Evaluator:
        return Evaluator(info.classes)

    def tiny(self, folder: Path) -> dict[str, dict]:
        root = synth.generate(folder, image_size=32, train_per_class=2, val_per_class=1)
        return {"data": {"root": str(root), "image_size": 32, "batch_size": 2, "num_workers": 0},
                "model": {"backbone": {"name": "resnet18", "weights": "none"}}}

    def report(self, metrics: dict, info: DataInfo, out_dir: Path) -> list[Path]:
        """The confusion matrix plot and a per-class accuracy table."""
        out_dir.mkdir(parents=True, exist_ok=True)
        figure = save_figure(confusion_figure(metrics["confusion"], info.classes), out_dir / "confusion_matrix.png")
        return [figure, per_class_table(metrics["confusion"], info.classes, out_dir / "per_class_accuracy.csv")]

    def inference_module(self, model: Classifier) -> nn.Module:
        return model  # images in, logits out

    def records(self, logits: torch.Tensor, info: DataInfo, options: PredictOptions) -> list[dict]:
        k = min(options.top_k, info.num_classes)
        probs, indices = logits.float().softmax(dim=1).topk(k, dim=1)
        return [{"class": info.classes[i_row[0]], "prob": p_row[0],
                 "top_k": [{"class": info.classes[i], "prob": p} for p, i in zip(p_row, i_row)]}
                for p_row, i_row in zip(probs.tolist(), indices.tolist())]

    def writer(self, out_dir: Path, info: DataInfo, options: PredictOptions) -> TopK:
        return TopK(out_dir, lambda logits: self.records(logits, info, options))
