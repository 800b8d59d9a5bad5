"""Detection reports: validation predictions as a COCO results file, per-class AP, and a picture of boxes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pipeline.tasks.common import fmt, write_csv  # noqa: E402

SHOW_SCORE = 0.5  # predictions drawn in the picture; the results file keeps every one


def write_results(results: list[dict], path: Path) -> Path:
    """COCO results format (image_id, category_id, bbox xywh, score) in original pixels and category ids: what
    `COCO.loadRes` and the COCO evaluation server read."""
    path.write_text(json.dumps(results))
    return path


def per_class_table(per_class: dict[str, tuple[float, float]], category_ids: list[int], path: Path) -> Path:
    """CSV of each class's AP and AP50; empty where the class has no ground truth (undefined)."""
    rows = [(name, cid, fmt(ap), fmt(ap50)) for (name, (ap, ap50)), cid in zip(per_class.items(), category_ids)]
    return write_csv(path, ["class", "category_id", "AP", "AP50"], rows)


def boxes_figure(samples: list[dict], classes: list[str], columns: int = 4):
    """Validation images with true boxes (green, dashed) and predictions scoring at least SHOW_SCORE (orange)."""
    rows = max(1, math.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples):
        ax.imshow(sample["image"])
        for box in sample["true_boxes"]:
            ax.add_patch(_rect(box, "lime", "--"))
        for box, score, label in zip(sample["boxes"], sample["scores"], sample["labels"]):
            if score < SHOW_SCORE:
                continue
            ax.add_patch(_rect(box, "orange", "-"))
            ax.text(box[0], box[1], f"{classes[label - 1]} {score:.2f}", color="black", fontsize=7,
                    va="bottom", bbox={"facecolor": "orange", "pad": 1, "linewidth": 0})
    fig.suptitle(f"validation: true boxes (green, dashed), predictions with score >= {SHOW_SCORE} (orange)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def _rect(box, color: str, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linestyle=style, linewidth=1.5)

