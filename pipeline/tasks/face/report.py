"""Face verification reports: one ROC curve per verification set."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.tasks.common import metric_key, save_figure  # noqa: E402


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, name: str, acc: float, tar: float):
    """TAR against FAR on a log axis, where the operating points of face verification (FAR 1e-3 and below) sit."""
    fig, ax = plt.subplots(figsize=(5, 4))
    # The log axis cannot show FAR 0; the smallest non-zero FAR this set can measure stands in for it.
    floor = np.min(fpr[fpr > 0]) if np.any(fpr > 0) else 1e-4
    ax.plot(np.maximum(fpr, floor / 2), tpr, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{name}: accuracy {acc:.4f}, TAR@FAR=1e-3 {tar:.4f}")
    fig.tight_layout()
    return fig


def write_roc(metrics: dict, names: list[str], out_dir: Path) -> list[Path]:
    """roc_<set>.png for each verification set, from the evaluator's `roc/<set>` entries."""
    paths = []
    for name in names:
        key = metric_key(name)
        fpr, tpr = metrics[f"roc/{name}"]
        fig = roc_figure(fpr, tpr, name, metrics[f"val/{key}/acc"], metrics[f"val/{key}/tar_at_far_1e-3"])
        paths.append(save_figure(fig, out_dir / f"roc_{key}.png"))
    return paths
