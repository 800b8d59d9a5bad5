"""COCO evaluation: ground truth fed back scores AP 1.0, shifted boxes score lower, predictions go back to the original
pixels and category ids, crowd regions neither reward nor punish, and the report files."""
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.detection.evaluate import Evaluator, coco_box_stats
from pipeline.tasks.detection.task import DetectionFacts

detection = registry.get("detection")
CLASSES, IDS = ["cat", "dog"], [3, 17]


def _target(image_id: int, boxes, labels, scale=(1.0, 1.0), crowd=None, size=(100, 120)) -> dict:
    """A target as CocoDetection makes it: boxes in the (possibly resized) input, ground truth in original pixels."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    sx, sy = scale
    original = boxes * torch.tensor([sx, sy, sx, sy])
    crowd = torch.tensor(crowd if crowd is not None else [False] * len(boxes), dtype=torch.bool)
    return {"boxes": boxes[~crowd], "labels": torch.tensor(labels, dtype=torch.int64)[~crowd],
            "image_id": torch.tensor(image_id), "scale": torch.tensor(scale), "orig_size": torch.tensor(size),
            "coco_boxes": torch.cat([original[:, :2], original[:, 2:] - original[:, :2]], dim=1),
            "coco_labels": torch.tensor(labels, dtype=torch.int64), "coco_crowd": crowd,
            "coco_area": (original[:, 2] - original[:, 0]) * (original[:, 3] - original[:, 1])}


def _targets():
    return [_target(1, [[10, 10, 40, 50], [60, 20, 90, 80]], [1, 2]),
            _target(2, [[5, 5, 25, 30]], [2], scale=(2.0, 2.0)),  # evaluated at half size
            _target(3, [], [])]  # no objects: any detection there is a false positive


def _evaluate(targets, shift: float = 0.0, extra: dict | None = None) -> dict:
    evaluator = Evaluator(CLASSES, IDS, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = [torch.zeros(3, 50, 60) for _ in targets]
    outputs = [{"boxes": t["boxes"] + shift, "scores": torch.full((len(t["boxes"]),), 0.9), "labels": t["labels"]}
               for t in targets]
    if extra:
        outputs[extra["image"]] = {k: torch.cat([outputs[extra["image"]][k], v]) for k, v in extra["add"].items()}
    evaluator.update(outputs, (images, targets))
    return evaluator.compute()


def test_ground_truth_fed_back_scores_one():
    metrics = _evaluate(_targets())
    for name in ("val/mAP", "val/AP50", "val/AP75", "val/AR100", "val/AP/cat", "val/AP/dog"):
        assert metrics[name] == pytest.approx(1.0), name
    assert math.isnan(metrics["val/APl"])  # no large objects: undefined, not 0 or -1
    assert metrics["per_class"] == {"cat": (pytest.approx(1.0), pytest.approx(1.0)),
                                    "dog": (pytest.approx(1.0), pytest.approx(1.0))}


def test_shifted_boxes_score_lower():
    exact, shifted = _evaluate(_targets()), _evaluate(_targets(), shift=4.0)
    assert 0.0 < shifted["val/mAP"] < exact["val/mAP"]
    assert shifted["val/AP50"] == pytest.approx(1.0)  # still overlapping by more than half


def test_predictions_go_back_to_original_pixels_and_category_ids():
    metrics = _evaluate(_targets())
    second = [r for r in metrics["results"] if r["image_id"] == 2]
    assert second == [{"image_id": 2, "category_id": 17, "bbox": [10.0, 10.0, 40.0, 50.0], "score": 0.9}]
    assert {r["category_id"] for r in metrics["results"]} == {3, 17}


def test_false_positive_on_an_empty_image_costs_precision():
    false_positive = {"image": 2, "add": {"boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]),
                                          "scores": torch.tensor([0.95]), "labels": torch.tensor([1])}}
    assert _evaluate(_targets(), extra=false_positive)["val/AP/cat"] < 1.0


def test_detections_on_crowd_regions_are_not_punished():
    targets = [_target(1, [[10, 10, 40, 50], [50, 50, 95, 95]], [1, 1], crowd=[False, True])]
    on_crowd = {"image": 0, "add": {"boxes": torch.tensor([[52.0, 52.0, 80.0, 80.0]]),
                                    "scores": torch.tensor([0.95]), "labels": torch.tensor([1])}}
    assert _evaluate(targets, extra=on_crowd)["val/mAP"] == pytest.approx(1.0)


def test_nothing_detected_is_zero_not_an_error():
    stats, per_class = coco_box_stats([{"id": 1, "width": 10, "height": 10}],
                                      [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25.0,
                                        "iscrowd": 0}], [], IDS, CLASSES)
    assert stats[0] == 0.0 and per_class["cat"] == (0.0, 0.0) and math.isnan(per_class["dog"][0])


def test_report_files(tmp_path: Path):
    metrics = _evaluate(_targets(), shift=1.0)
    info = DataInfo(classes=CLASSES, train_size=0, val_size=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    image_size=0, facts=DetectionFacts(IDS))
    paths = detection.report(metrics, info, tmp_path)
    assert [p.name for p in paths] == ["val_predictions.json", "per_class_ap.csv", "val_boxes.png"]
    results = json.loads(paths[0].read_text())
    assert len(results) == 3 and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    rows = paths[1].read_text().splitlines()
    assert rows[0] == "class,category_id,AP,AP50" and rows[2].startswith("dog,17,")
    assert paths[2].stat().st_size > 1000
