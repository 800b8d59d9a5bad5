"""The standard verification protocol (LFW, CFP-FP, AgeDB-30): cosine similarity of the pair's embeddings (each the
L2-normalised sum of the image's and its flip's embeddings), 10-fold cross-validation in file order choosing on
nine folds the threshold of best accuracy and testing it on the tenth; TAR at FAR 1e-3 the same way, with the
threshold of highest TAR whose false-accept rate on the nine folds stays at or below 1e-3.

Thresholds are exact: every cut between two distinct scores is tried (no grid), from one sort per fold.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tasks.common import metric_key
from pipeline.tasks.face import config as face_config
from pipeline.tasks.face.data import FOLDS

PRIMARY = face_config.PRIMARY.name  # the key this evaluator reports the primary metric under
FAR_TARGET = 1e-3


def cuts(scores: np.ndarray, issame: np.ndarray):
    """Every distinct decision threshold, highest first, with true and false accepts ("same" means score > t)."""
    order = np.argsort(-scores, kind="stable")
    ranked, same = scores[order], issame[order]
    tp = np.concatenate([[0], np.cumsum(same)])
    fp = np.concatenate([[0], np.cumsum(~same)])
    # Cut k accepts the top k scores: threshold halfway to the next score; only cuts between distinct scores count.
    valid = np.ones(len(ranked) + 1, dtype=bool)
    valid[1:-1] = ranked[:-1] > ranked[1:]
    thresholds = np.empty(len(ranked) + 1)
    thresholds[0] = ranked[0]
    thresholds[1:-1] = (ranked[:-1] + ranked[1:]) / 2
    thresholds[-1] = np.nextafter(ranked[-1], -np.inf)
    return thresholds[valid], tp[valid], fp[valid]


def best_accuracy_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    thresholds, tp, fp = cuts(scores, issame)
    negatives = int((~issame).sum())
    return float(thresholds[np.argmax(tp + negatives - fp)])


def far_threshold(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """The lowest threshold (most true accepts) whose false-accept rate is at most `far`."""
    thresholds, _, fp = cuts(scores, issame)
    allowed = fp <= far * max(1, int((~issame).sum()))
    return float(thresholds[np.flatnonzero(allowed)[-1]])  # the first cut accepts nothing, so one always fits


def evaluate_pairs(scores: np.ndarray, issame: np.ndarray, folds: int = FOLDS, far: float = FAR_TARGET) -> dict:
    """Accuracy (mean and std over folds), mean best threshold and TAR@FAR of the k-fold protocol, and the ROC."""
    accs, thresholds, tars = [], [], []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        threshold = best_accuracy_threshold(scores[train], issame[train])
        accs.append(np.mean((scores[test] > threshold) == issame[test]))
        thresholds.append(threshold)
        positives = issame[test]
        t_far = far_threshold(scores[train], issame[train], far)
        if positives.any():
            tars.append(np.mean(scores[test][positives] > t_far))
    _, tp, fp = cuts(scores, issame)
    return {"acc": float(np.mean(accs)), "acc_std": float(np.std(accs)), "threshold": float(np.mean(thresholds)),
            "tar": float(np.mean(tars)) if tars else 0.0,
            "roc": (fp / max(1, int((~issame).sum())), tp / max(1, int(issame.sum())))}


class Evaluator:
    """Sums the normalised embeddings of each image and its flip (dataset items 2i, 2i + 1), then scores each
    verification set's pairs with the k-fold protocol."""


    def __init__(self, sets: list[dict]):
        self.sets = sets
        self.sums: torch.Tensor | None = None

    def update(self, embeddings: torch.Tensor, batch) -> None:
        items = batch[1]
        embeddings = embeddings.float()
        if self.sums is None:
            total = sum(s["num_images"] for s in self.sets)
            self.sums = torch.zeros(total, embeddings.shape[1], device=embeddings.device)
        self.sums.index_add_(0, items // 2, embeddings)

    def compute(self) -> dict:
        out: dict = {}
        if self.sums is None:
            return {PRIMARY: 0.0}
        embeddings = F.normalize(self.sums, dim=1).cpu().numpy()
        start = 0
        for s in self.sets:
            own = embeddings[start:start + s["num_images"]]
            start += s["num_images"]
            pairs = np.asarray(s["pairs"], dtype=np.int64).reshape(-1, 2)
            scores = np.sum(own[pairs[:, 0]] * own[pairs[:, 1]], axis=1)
            result = evaluate_pairs(scores, np.asarray(s["issame"], dtype=bool))
            key = f"val/{metric_key(s['name'])}"
            out.update({f"{key}/acc": result["acc"], f"{key}/acc_std": result["acc_std"],
                        f"{key}/threshold": result["threshold"], f"{key}/tar_at_far_1e-3": result["tar"]})
            out[f"roc/{s['name']}"] = result["roc"]
        out[PRIMARY] = float(np.mean([out[f"val/{metric_key(s['name'])}/acc"] for s in self.sets]))
        return out
