"""The 10-fold verification protocol on scores and embeddings of known separability."""
import math

import numpy as np
import pytest
import torch

from pipeline.tasks.face.verification import Evaluator, best_accuracy_threshold, evaluate_pairs, far_threshold


def _folds(same_scores, diff_scores, folds: int = 10):
    """Scores and flags laid out like LFW's pairs.txt: per fold, its matched pairs then its mismatched pairs."""
    scores, issame = [], []
    for _ in range(folds):
        scores += list(same_scores) + list(diff_scores)
        issame += [True] * len(same_scores) + [False] * len(diff_scores)
    return np.array(scores, dtype=np.float64), np.array(issame)


def test_separable_pairs_score_perfectly_with_the_threshold_between_the_classes():
    scores, issame = _folds(np.linspace(0.5, 1.0, 30), np.linspace(-1.0, 0.4, 30))
    result = evaluate_pairs(scores, issame)
    assert result["acc"] == 1.0 and result["acc_std"] == 0.0
    assert result["threshold"] == pytest.approx(0.45)  # halfway between 0.4 and 0.5
    assert result["tar"] == 1.0
    fpr, tpr = result["roc"]
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def test_overlap_gives_the_expected_accuracy_and_tar():
    # 3 of each fold's 30 matched pairs score below every mismatched pair: the best any threshold can do is 57/60.
    same = np.concatenate([np.linspace(0.5, 1.0, 27), [-0.9, -0.95, -0.99]])
    scores, issame = _folds(same, np.linspace(-0.8, 0.4, 30))
    result = evaluate_pairs(scores, issame)
    assert result["acc"] == pytest.approx(57 / 60)
    assert result["threshold"] == pytest.approx(0.45)
    assert result["tar"] == pytest.approx(27 / 30)


def test_tar_at_far_uses_a_threshold_with_no_more_false_accepts_than_allowed():
    # One mismatched pair per fold scores 0.95: at FAR 1e-3 (< 1/270 on nine folds) it must stay rejected, so only
    # matched pairs above 0.95 are accepted.
    same = np.linspace(0.5, 1.0, 30)
    scores, issame = _folds(same, np.concatenate([np.linspace(-1.0, 0.4, 29), [0.95]]))
    result = evaluate_pairs(scores, issame)
    assert result["tar"] == pytest.approx(np.mean(same > 0.95))
    assert far_threshold(scores, issame, 0.5) < 0.5  # a loose FAR accepts more


def test_best_threshold_never_splits_tied_scores():
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    issame = np.array([True, True, False, False])
    threshold = best_accuracy_threshold(scores, issame)
    assert threshold == pytest.approx(0.7) or threshold == pytest.approx(0.3)


def test_evaluator_sums_each_image_and_its_flip_and_scores_each_set():
    # Set "a": image i at angle i·0.1 (4 images, pairs (0,1) same and (0,3) different); set "b" from another list.
    def unit(angle):
        return [math.cos(angle), math.sin(angle), 0.0]

    angles = [0.0, 0.1, 2.0, 3.0]
    pairs_a = [0, 1] * 5 + [0, 3] * 5
    sets = [{"name": "a", "num_images": 4, "pairs": pairs_a, "issame": [True] * 5 + [False] * 5},
            {"name": "b", "num_images": 2, "pairs": [0, 1] * 20, "issame": [True, False] * 10}]
    evaluator = Evaluator(sets)
    rows, items = [], []
    for i, angle in enumerate(angles + [0.0, 0.2]):
        # The image and its flip differ by ±0.5 rad; their normalised sum points at the angle itself.
        rows += [unit(angle + 0.5), unit(angle - 0.5)]
        items += [2 * i, 2 * i + 1]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))  # any batch order
    embeddings, items = torch.tensor(rows)[order], torch.tensor(items)[order]
    for chunk in range(0, len(items), 5):
        evaluator.update(embeddings[chunk:chunk + 5], (None, items[chunk:chunk + 5]))
    out = evaluator.compute()
    assert out["val/a/acc"] == 1.0
    # same pairs score cos 0.1, different ones cos 3.0: the threshold sits between them
    assert math.cos(3.0) < out["val/a/threshold"] < math.cos(0.1)
    assert out["val/b/acc"] == 0.5  # one pair labelled both ways: no threshold beats chance
    assert out["val/verif_acc"] == pytest.approx(0.75)
    assert set(out) >= {"val/a/acc_std", "val/a/tar_at_far_1e-3", "roc/a", "roc/b"}
