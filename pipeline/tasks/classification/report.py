"""Classification reports: the confusion-matrix figure and the per-class accuracy table."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.tasks.common import fmt, write_csv  # noqa: E402


def confusion_figure(cm: np.ndarray, classes: list[str], max_classes: int = 50):
    """Row-normalised confusion matrix (rows: true class); counts annotated when the matrix is small enough."""
    if len(classes) > max_classes:  # a 1000-class matrix is unreadable: show the most confused classes
        worst = np.argsort(np.diag(cm) / np.maximum(cm.sum(1), 1))[:max_classes]
        cm, classes = cm[np.ix_(worst, worst)], [classes[i] for i in worst]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix (top-1 {acc:.3f})")
    fig.tight_layout()
    return fig


def per_class_table(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """CSV of each class's validation support and accuracy; the accuracy is empty for a class without images."""
    rows = []
    for i, name in enumerate(classes):
        support = int(cm[i].sum())
        rows.append((name, support, fmt(cm[i, i] / support) if support else ""))
    return write_csv(path, ["class", "support", "accuracy"], rows)
