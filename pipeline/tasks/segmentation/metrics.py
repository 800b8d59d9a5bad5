"""Segmentation metrics from one confusion matrix accumulated over the whole validation set (not per image).

IoU of class c = TP / (TP + FP + FN) over all validation pixels. mIoU averages the classes that occur, in the ground
truth or in the predictions: a class absent from both has no defined IoU (0 / 0) and is left out of the mean rather
than counted as 0 or 1 (a val split without any cow would otherwise move mIoU by 1/21 either way). A class that is
predicted but never true has IoU 0 and stays in. Pixels labelled `ignore_index` count nowhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.tasks.common import metric_key
from pipeline.tasks.segmentation import config as segmentation_config

PRIMARY = segmentation_config.PRIMARY.name  # the key this evaluator reports the primary metric under
MAX_PER_CLASS_METRICS = 50
SAMPLES_KEPT = 8  # validation images kept for the overlay grid


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU per class from a (true, predicted) confusion matrix; NaN where the class is in neither."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy and mean class accuracy (over classes with ground-truth pixels) of a confusion matrix."""
    cm = confusion.double()
    total = cm.sum()
    if total == 0:
        return {PRIMARY: 0.0, "val/pixel_acc": 0.0, "val/mean_acc": 0.0}
    iou = per_class_iou(confusion)
    support = cm.sum(1)
    acc = cm.diag()[support > 0] / support[support > 0]
    return {PRIMARY: iou.nanmean().item(), "val/pixel_acc": (cm.diag().sum() / total).item(),
            "val/mean_acc": acc.mean().item()}



class Evaluator:
    """Confusion matrix (on the device) and mean loss over the validation set, plus a few samples for the report.

    `update` takes logits already at the mask's resolution (see `predict`), so scores are at label resolution.
    """


    def __init__(self, classes: list[str], ignore_index: int, samples: int = SAMPLES_KEPT):
        self.classes = classes
        self.num_classes = len(classes)
        self.ignore_index = ignore_index
        self.samples_wanted = samples
        self.confusion: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._pixels: torch.Tensor | None = None
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (image, true, predicted) on CPU

    def update(self, logits: torch.Tensor, batch) -> None:
        images, masks = batch
        logits = logits.float()
        n = self.num_classes
        if self.confusion is None:
            self.confusion = torch.zeros(n, n, dtype=torch.long, device=logits.device)
            self._loss = torch.zeros((), device=logits.device)
            self._pixels = torch.zeros((), dtype=torch.long, device=logits.device)
        pred = logits.argmax(1)
        valid = masks != self.ignore_index
        self.confusion += torch.bincount(masks[valid] * n + pred[valid], minlength=n * n).view(n, n)
        self._loss += F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="sum")
        self._pixels += valid.sum()
        take = self.samples_wanted - len(self.samples)
        if take > 0:
            self.samples += list(zip(images[:take].float().cpu(), masks[:take].cpu(), pred[:take].cpu()))

    def compute(self) -> dict:
        if self.confusion is None:
            return {PRIMARY: 0.0, "val/pixel_acc": 0.0, "val/mean_acc": 0.0, "val/loss": float("nan")}
        cm = self.confusion.cpu()
        iou = per_class_iou(cm)
        out = {**scores(cm), "val/loss": self._loss.item() / max(1, self._pixels.item()), "confusion": cm.numpy(),
               "iou": dict(zip(self.classes, iou.tolist())), "samples": self.samples}
        if self.num_classes <= MAX_PER_CLASS_METRICS:  # beyond that, the per-class CSV artifact is more readable
            # Classes absent from ground truth and predictions have no IoU this epoch and log nothing.
            out.update({f"val/iou/{metric_key(c)}": v for c, v in zip(self.classes, iou.tolist()) if v == v})
        return out
