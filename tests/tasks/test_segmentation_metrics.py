"""mIoU and friends from the confusion matrix, ignore pixels, and the report artifacts."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.tasks import registry
from pipeline.tasks.base import DataInfo
from pipeline.tasks.segmentation.metrics import Evaluator, per_class_iou, scores
from pipeline.tasks.segmentation.task import SegmentationFacts

seg = registry.get("segmentation")

CLASSES = ["background", "a", "b"]


def _logits(pred: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is `pred` (N, H, W)."""
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


def _evaluate(pred, true, ignore_index=255):
    evaluator = Evaluator(CLASSES, ignore_index)
    images = torch.zeros(len(true), 3, *true.shape[-2:])
    evaluator.update(_logits(pred), (images, true))
    return evaluator.compute()


def test_perfect_predictions_score_one():
    true = torch.randint(0, 3, (2, 5, 7))
    metrics = _evaluate(true.clone(), true)
    assert metrics["val/mIoU"] == 1.0 and metrics["val/pixel_acc"] == 1.0 and metrics["val/mean_acc"] == 1.0
    assert metrics["val/iou/a"] == 1.0


def test_known_confusion_matrix_matches_hand_computation():
    # rows: true class, columns: predicted class
    cm = torch.tensor([[5, 1, 0],
                       [2, 3, 1],
                       [0, 0, 4]])
    # IoU = TP / (row + column - TP): background 5/(6+7-5)=5/8, a 3/(6+4-3)=3/7, b 4/(4+5-4)=4/5
    iou = per_class_iou(cm)
    assert iou.tolist() == pytest.approx([5 / 8, 3 / 7, 4 / 5])
    s = scores(cm)
    assert s["val/mIoU"] == pytest.approx((5 / 8 + 3 / 7 + 4 / 5) / 3)
    assert s["val/pixel_acc"] == pytest.approx(12 / 16)
    assert s["val/mean_acc"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 4) / 3)
    # the evaluator builds exactly that matrix from pixels
    pairs = [(t, p) for t in range(3) for p in range(3) for _ in range(int(cm[t, p]))]
    true = torch.tensor([t for t, _ in pairs]).view(1, 4, 4)
    pred = torch.tensor([p for _, p in pairs]).view(1, 4, 4)
    metrics = _evaluate(pred, true)
    assert torch.equal(torch.as_tensor(metrics["confusion"]), cm)
    assert metrics["val/mIoU"] == pytest.approx(s["val/mIoU"])


def test_ignore_pixels_never_count_whatever_is_predicted_there():
    true = torch.tensor([[[1, 1, 255, 255], [2, 2, 255, 255]]])
    right = torch.tensor([[[1, 1, 0, 2], [2, 2, 1, 0]]])
    metrics = _evaluate(right, true)
    assert metrics["val/mIoU"] == 1.0 and metrics["confusion"].sum() == 4
    # a non-default ignore value works the same way
    true7 = torch.where(true == 255, 7, true)
    assert _evaluate(right, true7, ignore_index=7)["val/mIoU"] == 1.0


def test_classes_absent_from_truth_and_prediction_are_left_out_of_the_mean():
    true = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 0]]])
    metrics = _evaluate(pred, true)
    # background 2/3, a 1/2, b absent (no pixels either way): mean over two classes, no val/iou/b logged
    assert metrics["val/mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert "val/iou/b" not in metrics and math.isnan(metrics["iou"]["b"])
    # predicted but never true: IoU 0, counted
    pred = torch.tensor([[[0, 0, 1, 2]]])
    metrics = _evaluate(pred, true)
    assert metrics["val/iou/b"] == 0.0
    assert metrics["val/mIoU"] == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_matrix_accumulates_over_batches_not_averaged_per_image():
    evaluator = Evaluator(CLASSES, 255)
    big = torch.ones(1, 4, 4, dtype=torch.long)  # 16 pixels of class a, all right
    small = torch.tensor([[[1]]])  # 1 pixel of class a, predicted background
    evaluator.update(_logits(big), (torch.zeros(1, 3, 4, 4), big))
    evaluator.update(_logits(torch.zeros_like(small)), (torch.zeros(1, 3, 1, 1), small))
    metrics = evaluator.compute()
    # pooled: a has TP 16, FN 1 -> 16/17; background TP 0, FP 1 -> 0. Per-image means would give (1 + 0)/... instead
    assert metrics["val/iou/a"] == pytest.approx(16 / 17) and metrics["val/iou/background"] == 0.0


def test_report_writes_overlays_bars_and_table(tmp_path):
    true = torch.zeros(3, 8, 8, dtype=torch.long)
    true[:, 2:6, 2:6] = 1
    true[:, 0, :] = 255
    pred = torch.where(true == 255, 0, true)
    evaluator = Evaluator(CLASSES, 255, samples=2)
    evaluator.update(_logits(pred), (torch.rand(3, 3, 8, 8), true))
    metrics = evaluator.compute()
    assert len(metrics["samples"]) == 2
    info = DataInfo(classes=CLASSES, train_size=0, val_size=3, mean=(0.5,) * 3, std=(0.25,) * 3, image_size=8,
                    facts=SegmentationFacts(255))
    paths = seg.report(metrics, info, tmp_path / "report")
    assert [p.name for p in paths] == ["overlays.png", "per_class_iou.png", "per_class_iou.csv"]
    for path in paths[:2]:
        with Image.open(path) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    rows = paths[2].read_text().splitlines()
    assert rows[0] == "class,iou,accuracy,true_pixels,predicted_pixels"
    assert rows[2] == "a,1.0000,1.0000,48,48"
    assert rows[3] == "b,,,0,0"  # absent: no IoU, no accuracy


def test_overlay_tints_classes_and_greys_ignored_pixels():
    from pipeline.tasks.segmentation.report import IGNORE_COLOR, overlay, palette

    colors = palette(21)
    assert np.allclose(colors[1] * 255, (128, 0, 0)) and np.allclose(colors[15] * 255, (192, 128, 128))  # VOC's
    image = np.full((1, 3, 3), 0.5)
    out = overlay(image, np.array([[0, 1, 255]]), colors, 255)
    assert np.allclose(out[0, 0], 0.5) and not np.allclose(out[0, 1], 0.5) and np.allclose(out[0, 2], IGNORE_COLOR)


# ---------------------------------------------------------------------------------------------------------------------
# Against a reference computed here from the masks, pixel by pixel with NumPy


def reference(truths: list[np.ndarray], predictions: list[np.ndarray], num_classes: int, ignore: int) -> dict:
    """mIoU over the classes present in the truth or the prediction, pixel accuracy, and mean accuracy over the classes
    with true pixels, of every pixel of every image pooled; pixels whose truth is `ignore` count nowhere."""
    true = np.concatenate([t.ravel() for t in truths])
    pred = np.concatenate([p.ravel() for p in predictions])
    kept = true != ignore
    true, pred = true[kept], pred[kept]
    ious, accs = {}, {}
    for c in range(num_classes):
        tp = np.sum((true == c) & (pred == c))
        union = np.sum((true == c) | (pred == c))
        if union:
            ious[c] = tp / union
        if np.sum(true == c):
            accs[c] = tp / np.sum(true == c)
    return {"val/mIoU": float(np.mean(list(ious.values()))), "val/pixel_acc": float(np.mean(true == pred)),
            "val/mean_acc": float(np.mean(list(accs.values()))), "iou": ious}


def test_metrics_agree_with_a_pixel_reference_on_masks_of_several_sizes():
    """Five classes over three batches of different sizes: class 3 appears nowhere (no IoU, left out of the mean),
    class 4 is predicted but never true (IoU 0, in the mean), and a fifth of the pixels are 255 with predictions of
    every class under them."""
    classes, ignore = ["background", "a", "b", "absent", "phantom"], 255
    rng = np.random.default_rng(0)
    evaluator = Evaluator(classes, ignore)
    truths, predictions = [], []
    for n, (h, w) in ((2, (9, 13)), (1, (16, 7)), (3, (5, 5))):
        true = rng.choice([0, 1, 2], size=(n, h, w), p=[0.5, 0.3, 0.2])
        pred = np.where(rng.random(true.shape) < 0.6, true, rng.choice([0, 1, 2, 4], size=true.shape))
        true = np.where(rng.random(true.shape) < 0.2, ignore, true)
        pred = np.where(true == ignore, rng.integers(0, len(classes), size=true.shape), pred)
        truths.append(true)
        predictions.append(pred)
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), len(classes)).permute(0, 3, 1, 2).float()
        evaluator.update(logits, (torch.zeros(n, 3, h, w), torch.from_numpy(true)))
    expected = reference(truths, predictions, len(classes), ignore)
    assert set(expected["iou"]) == {0, 1, 2, 4} and expected["iou"][4] == 0.0  # the cases this test is about
    metrics = evaluator.compute()
    for key in ("val/mIoU", "val/pixel_acc", "val/mean_acc"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12), key
    assert metrics["val/iou/phantom"] == 0.0 and "val/iou/absent" not in metrics
    assert {c: metrics["iou"][classes[c]] for c in expected["iou"]} == pytest.approx(
        {c: float(v) for c, v in expected["iou"].items()}, rel=1e-12)
    assert int(metrics["confusion"].sum()) == sum(int(np.sum(t != ignore)) for t in truths)
