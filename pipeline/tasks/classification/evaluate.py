"""Classification metrics from a confusion matrix accumulated on the device: top-1, top-5, loss, per-class accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.tasks.classification import config as classification_config
from pipeline.tasks.common import metric_key

PRIMARY = classification_config.PRIMARY.name  # the key this evaluator reports the primary metric under
MAX_PER_CLASS_METRICS = 50  # beyond that, the per-class CSV artifact is more readable than metric keys


class Evaluator:

    def __init__(self, classes: list[str]):
        self.num_classes = len(classes)
        self.classes = classes
        self.confusion: torch.Tensor | None = None
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
            return {PRIMARY: 0.0, "val/loss": float("nan")}
        cm = self.confusion.cpu()
        support = cm.sum(1)
        # A class without validation images has no accuracy: NaN, left out of the mean (not counted as 0).
        per_class = torch.where(support > 0, cm.diag().float() / support.clamp(min=1).float(),
                                torch.tensor(float("nan"))).tolist()
        present = [a for a in per_class if a == a]
        out = {PRIMARY: cm.diag().sum().item() / self.count, "val/loss": self._loss.item() / self.count,
               "val/mean_class_acc": sum(present) / len(present) if present else float("nan"),
               "confusion": cm.numpy(), "per_class": dict(zip(self.classes, per_class))}
        if self.num_classes > 5:  # with 5 classes or fewer top-5 is 1.0 by construction
            out["val/top5"] = self._top5.item() / self.count
        if self.num_classes <= MAX_PER_CLASS_METRICS:
            out.update({f"val/acc/{metric_key(c)}": acc for c, acc in zip(self.classes, per_class) if acc == acc})
        return out
