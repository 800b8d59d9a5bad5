"""COCO mAP end to end: a short `pipeline run` on a COCO-format set written here, then pycocotools' COCOeval on the
annotation file and the run's logged predictions (report/val_predictions.json) must give the val/mAP, val/AP50 and
val/AP75 the run logged, and those predictions must be what `pipeline predict` of the best checkpoint finds.

The set has what breaks a detection pipeline without an error: category ids 3, 17 and 42 (not contiguous), images of
several sizes none of them square (validation resizes each to 64 x 64, so x and y scale back differently), a crowd
box over a group of objects, and an image without any object.
"""
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.cli import main
from pipeline.train import checkpoint, runner

pytestmark = pytest.mark.e2e

CATEGORIES = {3: "square", 17: "disc", 42: "triangle"}
COLORS = {3: (230, 60, 60), 17: (60, 220, 90), 42: (80, 120, 255)}
# (width, height) of each image: landscape and portrait at several sizes, never square
SIZES = [(96, 64), (64, 96), (128, 72), (72, 120), (112, 64), (64, 112), (120, 80), (88, 64)]
CROWD_IMAGE, EMPTY_IMAGE = 106, 107  # the image ids of the crowd scene and of the empty one
CROWD_BOX = [8, 28, 62, 20]  # x, y, width, height: three small squares, annotated as one crowd region
EPOCHS = 16


def _draw(draw: ImageDraw.ImageDraw, category: int, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if category == 3:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLORS[category])
    elif category == 17:
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=COLORS[category])
    else:
        draw.polygon([(x0, y1 - 1), ((x0 + x1) / 2, y0), (x1 - 1, y1 - 1)], fill=COLORS[category])


def write_coco(root: Path, seed: int = 0) -> Path:
    """Images under root/images and two annotation files (integer boxes, so that the file's boxes and the pipeline's
    need no rounding to agree): root/annotations/val.json, every image, and train.json without the crowd scene (its
    squares under the crowd box would train as background) which it returns last."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, (width, height) in enumerate(SIZES):
        image_id = 100 + index
        image = Image.fromarray(rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        if image_id == CROWD_IMAGE:
            for k in range(3):  # shapes the detector learns elsewhere, inside a region marked as a crowd
                _draw(draw, 3, (10 + 22 * k, 30, 26 + 22 * k, 46))
            annotations.append({"image_id": image_id, "category_id": 3, "bbox": CROWD_BOX, "area": 3 * 256.0,
                                "iscrowd": 1})
            _draw(draw, 17, (72, 8, 102, 38))
            annotations.append({"image_id": image_id, "category_id": 17, "bbox": [72, 8, 30, 30], "area": 706.0,
                                "iscrowd": 0})
        elif image_id != EMPTY_IMAGE:
            placed: list[tuple[int, int, int]] = []
            for _ in range(int(rng.integers(1, 4))):
                for _ in range(50):
                    side = int(rng.integers(16, min(width, height) // 2 + 1))
                    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
                    if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y for px, py, ps in placed):
                        break
                else:
                    continue
                placed.append((x, y, side))
                category = int(rng.choice(list(CATEGORIES)))
                _draw(draw, category, (x, y, x + side, y + side))
                annotations.append({"image_id": image_id, "category_id": category, "bbox": [x, y, side, side],
                                    "area": float(side * side), "iscrowd": 0})
        image.save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    for number, annotation in enumerate(annotations, start=1):  # COCOeval needs annotation ids from 1
        annotation["id"] = number
    (root / "annotations").mkdir()
    categories = [{"id": i, "name": n} for i, n in CATEGORIES.items()]
    (root / "annotations" / "train.json").write_text(json.dumps({
        "images": [i for i in images if i["id"] != CROWD_IMAGE], "categories": categories,
        "annotations": [a for a in annotations if a["image_id"] != CROWD_IMAGE]}))
    path = root / "annotations" / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@dataclass
class Run:
    run_id: str
    uri: str
    annotations: Path
    images: Path
    output_dir: Path


@pytest.fixture(scope="module")
def run(module_dir: Path, empty_store: Path) -> Run:
    """A short run on the set, validated on its training images and the crowd scene (a few dozen steps learn these
    images, not shapes in general)."""
    import shutil

    shutil.copy(empty_store, module_dir / "mlflow.db")
    uri = f"sqlite:///{module_dir}/mlflow.db"
    annotations = write_coco(module_dir / "coco")
    resize = [{"name": "Resize", "height": 64, "width": 64}]  # another scale along x than along y, every image
    cfg = {"task": "detection", "seed": 0,
           "data": {"root": str(module_dir / "coco"), "train_ann": "annotations/train.json",
                    "val_ann": "annotations/val.json", "train_images": "images", "val_images": "images",
                    "image_size": 64, "batch_size": 2, "num_workers": 0, "train_transforms": resize,
                    "val_transforms": resize},
           "model": {"backbone": {"name": "resnet18", "weights": "none"}, "frozen_bn": False, "min_size": 64,
                     "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32,
                     "representation_size": 128, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300,
                     "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100},
           # fp32 and one thread: `pipeline predict` must find the same boxes as the run's evaluation
           "train": {"epochs": EPOCHS, "optimizer": "sgd", "lr": 0.02, "schedule": "constant", "warmup_epochs": 1,
                     "weight_decay": 1e-4, "clip_grad_norm": 5.0, "precision": "fp32", "threads": 1,
                     "output_dir": str(module_dir / "out")},
           "tracking": {"uri": uri, "log_model": False, "log_checkpoint": False}}
    path = module_dir / "coco_e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(module_dir)
        result = runner.run(path)
    return Run(result.run_id, uri, annotations, module_dir / "coco" / "images", result.output_dir)


def cocoeval(annotations: Path, results: Path) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates on stdout
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(str(results)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats]


def test_logged_map_equals_cocoeval_on_the_annotation_file_and_the_logged_predictions(run: Run):
    client = MlflowClient(run.uri)
    metrics = client.get_run(run.run_id).data.metrics
    best_epoch = int(metrics["best/epoch"])
    logged = {key: {m.step: m.value for m in client.get_metric_history(run.run_id, key)}
              for key in ("val/mAP", "val/AP50", "val/AP75")}
    assert all(sorted(history) == list(range(1, EPOCHS + 1)) for history in logged.values())
    predictions = run.output_dir / "report" / "val_predictions.json"  # the best checkpoint's, logged as an artifact
    assert "report/val_predictions.json" in {a.path for a in client.list_artifacts(run.run_id, "report")}
    stats = cocoeval(run.annotations, predictions)
    assert stats[0] == pytest.approx(logged["val/mAP"][best_epoch], abs=1e-12)
    assert stats[1] == pytest.approx(logged["val/AP50"][best_epoch], abs=1e-12)
    assert stats[2] == pytest.approx(logged["val/AP75"][best_epoch], abs=1e-12)
    assert metrics["best/mAP"] == pytest.approx(stats[0], abs=1e-12)
    # not a match of two zeros: the run learned these images
    assert stats[1] >= 0.4 and stats[0] >= 0.1, stats


def test_the_set_has_the_cases_it_claims_and_the_predictions_meet_them(run: Run):
    truth = json.loads(run.annotations.read_text())
    assert sorted(c["id"] for c in truth["categories"]) == [3, 17, 42]
    assert all(i["width"] != i["height"] for i in truth["images"]) and len({(i["width"], i["height"])
                                                                            for i in truth["images"]}) > 4
    assert not [a for a in truth["annotations"] if a["image_id"] == EMPTY_IMAGE]
    predictions = json.loads((run.output_dir / "report" / "val_predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {3, 17, 42} and {p["category_id"] for p in predictions} > set()
    # the detector fires inside the crowd region, where COCOeval neither rewards nor punishes it: the logged mAP
    # equals COCOeval's only if the pipeline scores crowds as COCOeval does
    x, y, w, h = CROWD_BOX
    inside = [p for p in predictions if p["image_id"] == CROWD_IMAGE and p["score"] >= 0.3
              and x - 2 <= p["bbox"][0] and p["bbox"][0] + p["bbox"][2] <= x + w + 2
              and y - 2 <= p["bbox"][1] and p["bbox"][1] + p["bbox"][3] <= y + h + 2]
    assert inside, [p for p in predictions if p["image_id"] == CROWD_IMAGE]


def _xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def test_the_logged_predictions_are_what_predict_finds_with_the_best_checkpoint(run: Run, tmp_path: Path):
    """Two ways back to the annotation file's pixels and ids, the evaluator's and predict's, give the same boxes."""
    files = sorted(run.images.glob("*.png"))
    result = CliRunner().invoke(main, ["predict", str(run.output_dir / checkpoint.BEST), *map(str, files),
                                       "--out", str(tmp_path), "--score", "0"])
    assert result.exit_code == 0, result.output
    ids = {i["file_name"]: i["id"] for i in json.loads(run.annotations.read_text())["images"]}
    predicted = [{**p, "image_id": ids[Path(p["file_name"]).name]}
                 for p in json.loads((tmp_path / "predictions.json").read_text())]
    logged = json.loads((run.output_dir / "report" / "val_predictions.json").read_text())
    compared = 0
    for ours, theirs in ((logged, predicted), (predicted, logged)):
        for p in ours:
            if p["score"] < 0.1:  # near the detector's own score threshold either side may keep or drop a box
                continue
            compared += 1
            assert any(q["image_id"] == p["image_id"] and q["category_id"] == p["category_id"]
                       and _iou(_xyxy(q["bbox"]), _xyxy(p["bbox"])) >= 0.99 for q in theirs), p
    assert compared >= 10
