"""The 10-fold verification protocol on scores and embeddings of known separability, and against a reference written
here the way insightface's `calculate_roc` does it, on score sets where a threshold chosen with the test fold in view
gives another answer."""
import math

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold

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


# ---------------------------------------------------------------------------------------------------------------------
# Against a reference: insightface's calculate_roc (recognition/arcface_torch/eval/verification.py), written out


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds to try, strictest first: above every score, halfway between each two neighbouring distinct scores,
    and just below the lowest ("same" means score > threshold). insightface tries a fixed grid instead; these are the
    cuts such a grid approaches, and the ones the pipeline documents."""
    distinct = np.unique(scores)[::-1]
    return np.concatenate([[distinct[0]], (distinct[:-1] + distinct[1:]) / 2, [np.nextafter(distinct[-1], -np.inf)]])


def _accuracy(threshold: float, scores: np.ndarray, issame: np.ndarray) -> float:
    predicted = scores > threshold
    tp, tn = np.sum(predicted & issame), np.sum(~predicted & ~issame)
    return float(tp + tn) / scores.size


def reference(scores: np.ndarray, issame: np.ndarray, folds: int = 10, far: float = 1e-3,
              leak: bool = False) -> dict:
    """calculate_roc: KFold without shuffling (file order), on each training part the threshold of best accuracy
    (np.argmax: the first, so the strictest, of equal ones), its accuracy on the test fold. TAR at FAR: on the training
    part the lowest threshold whose false-accept rate is at most `far`, its true-accept rate on the test fold's
    matched pairs (folds without any are left out). `leak=True` chooses on every pair, test fold included: the bug
    this reference exists to tell apart."""
    accs, thresholds, tars = [], [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(scores):
        if leak:
            train = np.arange(len(scores))
        s, same = scores[train], issame[train]
        candidates = _candidates(s)
        best = candidates[int(np.argmax([_accuracy(t, s, same) for t in candidates]))]
        accs.append(_accuracy(best, scores[test], issame[test]))
        thresholds.append(best)
        negatives = s[~same]
        allowed = [t for t in candidates if np.sum(negatives > t) <= far * max(1, negatives.size)]
        if issame[test].any():
            tars.append(float(np.mean(scores[test][issame[test]] > min(allowed))))
    return {"acc": float(np.mean(accs)), "acc_std": float(np.std(accs)), "threshold": float(np.mean(thresholds)),
            "tar": float(np.mean(tars)) if tars else 0.0}


def _drifting_folds(pairs: int, seed: int, decimals: int | None = None, without_positives: int | None = None):
    """`pairs` scores in file order whose folds differ: fold k's matched and mismatched scores both drift upward
    with k (as sets recorded under other conditions do), overlapping, matched and mismatched interleaved. Rounded to
    `decimals` they tie; fold `without_positives` holds mismatched pairs only."""
    rng = np.random.default_rng(seed)
    issame = rng.random(pairs) < 0.5
    fold = np.concatenate([np.full(len(test), k) for k, (_, test) in enumerate(KFold(n_splits=10).split(issame))])
    if without_positives is not None:
        issame[fold == without_positives] = False
    scores = rng.normal(0.1, 0.15, pairs) + 0.35 * issame + 0.06 * fold
    return (np.round(scores, decimals) if decimals is not None else scores), issame


SCORE_SETS = {
    "drifting folds": _drifting_folds(600, seed=0),
    "non-divisible count": _drifting_folds(607, seed=1),
    "tied scores": _drifting_folds(403, seed=2, decimals=2),
    "a fold without matched pairs": _drifting_folds(305, seed=3, without_positives=4),
    "few pairs": _drifting_folds(23, seed=7, decimals=1),
}


@pytest.mark.parametrize("name", SCORE_SETS)
def test_ten_folds_agree_with_the_reference_and_the_test_fold_never_chooses(name: str):
    scores, issame = SCORE_SETS[name]
    expected = reference(scores, issame)
    assert 0.5 < expected["acc"] < 1.0 and expected["acc_std"] > 0  # neither separable nor alike across folds
    result = evaluate_pairs(scores, issame)
    for key in ("acc", "acc_std", "threshold", "tar"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    # the score set tells the protocol from the leak: choosing with the test fold in view gives another answer
    leaked = reference(scores, issame, leak=True)
    assert leaked["acc"] != pytest.approx(expected["acc"], abs=1e-9)


def test_the_score_sets_have_what_they_claim():
    scores, issame = SCORE_SETS["tied scores"]
    assert len(np.unique(scores)) < len(scores) / 3  # most pairs share their score with others
    scores, issame = SCORE_SETS["a fold without matched pairs"]
    folds = [issame[test] for _, test in KFold(n_splits=10).split(scores)]
    assert sum(not f.any() for f in folds) == 1 and all(f.any() for i, f in enumerate(folds) if i != 4)
    for name in ("non-divisible count", "few pairs"):
        assert len(SCORE_SETS[name][0]) % 10
    # a fold without matched pairs has no TAR: the mean is over the nine others, not counted as 0
    tars_of_nine = reference(scores, issame)["tar"]
    assert tars_of_nine > 0 and evaluate_pairs(scores, issame)["tar"] == pytest.approx(tars_of_nine)
