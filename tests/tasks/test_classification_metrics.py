"""Classification metrics at their edges, from known confusion matrices: a class without validation images has no
accuracy (NaN, left out of the mean and of the per-class metric keys), top-5 is only logged with more than 5 classes,
and the per-class table keeps any class name as one CSV field."""
import csv
import math

import pytest
import torch

from pipeline.tasks.classification.evaluate import Evaluator
from pipeline.tasks.classification.report import per_class_table

QUOTED = 'bird, "tweety"'  # a comma and quotes: one CSV field all the same
CLASSES = ["cat", "dog", QUOTED, "empty"]  # "empty" has no validation image


def _logits(samples: list[tuple[int, int, int]], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for (label, predicted class, rank of the label in the scores) samples: the predicted class
    scores highest, the label sits at the given rank (0 when it is the prediction), the other classes fill the rest."""
    rows, labels = [], []
    for label, pred, rank in samples:
        assert (rank == 0) == (label == pred)
        others = [c for c in range(num_classes) if c not in (label, pred)]
        order = [pred] + others
        if rank:
            order.insert(rank, label)
        scores = torch.empty(num_classes)
        scores[order] = torch.arange(num_classes, 0, -1, dtype=torch.float32)
        rows.append(scores)
        labels.append(label)
    return torch.stack(rows), torch.tensor(labels)


def _evaluate(classes: list[str], samples: list[tuple[int, int, int]], batches: int = 2) -> dict:
    evaluator = Evaluator(classes)
    logits, labels = _logits(samples, len(classes))
    for chunk_logits, chunk_labels in zip(logits.chunk(batches), labels.chunk(batches)):
        evaluator.update(chunk_logits, (None, chunk_labels))  # the images are not read
    return evaluator.compute()


# confusion matrix (rows: true class)   cat dog bird empty
#   cat                                   3   1    0     0
#   dog                                   0   2    0     0
#   bird, "tweety"                        2   0    1     1
#   empty                                 0   0    0     0
FOUR = ([(0, 0, 0)] * 3 + [(0, 1, 1)] + [(1, 1, 0)] * 2 + [(2, 0, 1)] * 2 + [(2, 2, 0)] + [(2, 3, 1)])


def test_a_class_without_validation_images_is_left_out_not_counted_as_zero():
    metrics = _evaluate(CLASSES, FOUR)
    assert metrics["confusion"].tolist() == [[3, 1, 0, 0], [0, 2, 0, 0], [2, 0, 1, 1], [0, 0, 0, 0]]
    assert metrics["val/top1"] == pytest.approx(6 / 10)
    # the mean over the three classes with images (counting "empty" as 0 would give 0.5)
    assert metrics["val/mean_class_acc"] == pytest.approx((3 / 4 + 2 / 2 + 1 / 4) / 3)
    per_class = metrics["per_class"]
    assert list(per_class) == CLASSES
    assert per_class["cat"] == pytest.approx(0.75) and per_class["dog"] == 1.0 and per_class[QUOTED] == 0.25
    assert math.isnan(per_class["empty"])
    assert metrics["val/acc/cat"] == pytest.approx(0.75) and metrics["val/acc/dog"] == 1.0
    assert metrics["val/acc/bird_ _tweety_"] == 0.25  # the name as an MLflow metric key
    assert "val/acc/empty" not in metrics
    assert not any(isinstance(v, float) and math.isnan(v) for k, v in metrics.items() if k.startswith("val/acc/"))
    assert "val/top5" not in metrics  # 4 classes: top-5 would be 1.0 by construction


def test_merged_shards_give_the_metrics_of_the_whole_set():
    logits, labels = _logits(FOUR, len(CLASSES))
    whole, first, second = Evaluator(CLASSES), Evaluator(CLASSES), Evaluator(CLASSES)
    whole.update(logits, (None, labels))
    first.update(logits[:4], (None, labels[:4]))
    second.update(logits[4:], (None, labels[4:]))
    first.merge(second)
    merged, expected = first.compute(), whole.compute()
    assert (merged["confusion"] == expected["confusion"]).all()
    for key in ("val/top1", "val/mean_class_acc", "val/loss"):
        assert merged[key] == pytest.approx(expected[key]), key


def test_top5_with_six_classes_counts_labels_ranked_in_the_first_five():
    classes = ["a", "b", "c", "d", "e", "empty"]
    samples = [(0, 0, 0), (0, 0, 0),
               (1, 2, 3),  # 4th: a top-5 hit
               (2, 3, 5),  # 6th, last: a miss
               (3, 3, 0),
               (4, 0, 4)]  # 5th: still a hit
    metrics = _evaluate(classes, samples)
    assert metrics["val/top1"] == pytest.approx(3 / 6)
    assert metrics["val/top5"] == pytest.approx(5 / 6)
    assert metrics["val/mean_class_acc"] == pytest.approx(2 / 5)  # "empty" left out (counted as 0: 2 / 6)
    assert math.isnan(metrics["per_class"]["empty"]) and "val/acc/empty" not in metrics


@pytest.mark.parametrize("num_classes", [2, 5, 6])
def test_top5_is_logged_only_with_more_than_five_classes(num_classes):
    classes = [f"c{i}" for i in range(num_classes)]
    metrics = _evaluate(classes, [(i, i, 0) for i in range(num_classes)], batches=1)
    assert ("val/top5" in metrics) == (num_classes > 5)
    assert metrics["val/top1"] == 1.0 and metrics["val/mean_class_acc"] == 1.0


def test_per_class_table_keeps_odd_names_as_one_field_and_leaves_undefined_accuracy_empty(tmp_path):
    metrics = _evaluate(CLASSES, FOUR)
    path = per_class_table(metrics["confusion"], CLASSES, tmp_path / "per_class_accuracy.csv")
    assert path == tmp_path / "per_class_accuracy.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["class", "support", "accuracy"],
                    ["cat", "4", "0.7500"],
                    ["dog", "2", "1.0000"],
                    [QUOTED, "4", "0.2500"],
                    ["empty", "0", ""]]
