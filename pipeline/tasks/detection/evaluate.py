"""COCO box evaluation with pycocotools' COCOeval, in the original images' pixels and category ids.

Predictions are mapped back from the transformed image by its per-axis scale, so validation transforms may resize
but not crop, pad or flip. The evaluator collects the ground truth from the validation targets it sees (crowd
annotations included, which COCOeval treats as regions where detections are neither rewarded nor punished), so the
score is that of exactly the images evaluated and needs no second read of the annotation file.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.tasks.common import metric_key
from pipeline.tasks.detection import config as detection_config

PRIMARY = detection_config.PRIMARY.name  # the key this evaluator reports the primary metric under
# COCOeval.stats positions of the logged numbers (AP at IoU .5:.95 / .5 / .75, by object size, recall at 100).
STATS = {PRIMARY: 0, "val/AP50": 1, "val/AP75": 2, "val/APs": 3, "val/APm": 4, "val/APl": 5, "val/AR100": 8}
MAX_PER_CLASS_METRICS = 50
SAMPLES = 8  # validation images kept for the picture of predicted and true boxes


class Evaluator:

    def __init__(self, classes: list[str], category_ids: list[int], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        self.classes = classes
        self.category_ids = category_ids
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.results: list[dict] = []
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.samples: list[dict] = []

    def update(self, outputs: list[dict[str, torch.Tensor]], batch) -> None:
        images, targets = batch
        for image, out, target in zip(images, outputs, targets):
            image_id = int(target["image_id"])
            height, width = (int(v) for v in target["orig_size"])
            self.images.append({"id": image_id, "width": width, "height": height})
            sx, sy = target["scale"].tolist()
            boxes = out["boxes"].detach().float().cpu() * torch.tensor([sx, sy, sx, sy])
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].float().tolist(), out["labels"].tolist()):
                self.results.append({"image_id": image_id, "category_id": self.category_ids[label - 1],
                                     "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
            for box, label, crowd, area in zip(target["coco_boxes"].tolist(), target["coco_labels"].tolist(),
                                               target["coco_crowd"].tolist(), target["coco_area"].tolist()):
                self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                         "category_id": self.category_ids[label - 1], "bbox": box,
                                         "area": area, "iscrowd": int(crowd)})
            if len(self.samples) < SAMPLES:
                self.samples.append(self._sample(image, out, target))

    def _sample(self, image: torch.Tensor, out: dict, target: dict) -> dict:
        pixels = (image.detach().float().cpu() * self.std + self.mean).clamp(0, 1).mul(255).byte()
        return {"image": pixels.permute(1, 2, 0).numpy(), "boxes": out["boxes"].detach().float().cpu().numpy(),
                "scores": out["scores"].detach().float().cpu().numpy(), "labels": out["labels"].cpu().numpy(),
                "true_boxes": target["boxes"].cpu().numpy()}

    def compute(self) -> dict:
        stats, per_class = coco_box_stats(self.images, self.annotations, self.results, self.category_ids,
                                          self.classes)
        out: dict = {name: stats[i] for name, i in STATS.items()}
        if len(self.classes) <= MAX_PER_CLASS_METRICS:  # beyond that, the per-class table is more readable
            out.update({f"val/AP/{metric_key(c)}": ap for c, (ap, _) in per_class.items()})
        out.update(per_class=per_class, results=self.results, samples=self.samples)
        return out


def coco_box_stats(images: list[dict], annotations: list[dict], results: list[dict], category_ids: list[int],
                   classes: list[str]) -> tuple[list[float], dict[str, tuple[float, float]]]:
    """COCOeval's 12 summary numbers (undefined ones, such as APs without small objects, as NaN) and per-class
    (AP, AP50). Ids of annotations must start at 1: COCOeval takes a matched id 0 for "unmatched"."""
    if not results:  # nothing detected: AP 0 wherever there was something to find (loadRes refuses an empty list)
        present = {a["category_id"] for a in annotations}
        return ([0.0 if annotations else math.nan] * 12,
                {c: (0.0, 0.0) if i in present else (math.nan, math.nan) for i, c in zip(category_ids, classes)})
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": i, "name": c} for i, c in zip(category_ids, classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step on stdout
        ground_truth.createIndex()
        detections = ground_truth.loadRes([dict(r) for r in results])  # it adds keys to the dicts it gets
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.params.imgIds = sorted(image["id"] for image in images)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) if v >= 0 else math.nan for v in evaluation.stats]
    # precision: [IoU threshold, recall, category, area range (0: all), max detections (-1: 100)]
    precision = evaluation.eval["precision"]
    per_class = {}
    for k, name in enumerate(classes):
        p, p50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class[name] = (float(p[p > -1].mean()) if (p > -1).any() else math.nan,
                           float(p50[p50 > -1].mean()) if (p50 > -1).any() else math.nan)
    return stats, per_class

