"""Segmentation reports: validation images with true and predicted masks overlaid, per-class IoU bars and table."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from pipeline.tasks.common import fmt, write_csv  # noqa: E402
from pipeline.tasks.segmentation.metrics import per_class_iou  # noqa: E402

ALPHA = 0.55  # how strongly a class colour covers the image
IGNORE_COLOR = (0.75, 0.75, 0.75)
LEGEND_MAX = 40  # classes named in the legend of the overlay grid


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) colours in 0..1: Pascal VOC's colour map (bits of the index spread over r, g, b), so VOC
    classes get their familiar colours and any class count gets distinct ones. Index 0 (background) is black."""
    colors = np.zeros((num_classes, 3), dtype=np.float64)
    for index in range(num_classes):
        c, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        colors[index] = np.array(rgb) / 255.0
    return colors


def overlay(image: np.ndarray, mask: np.ndarray, colors: np.ndarray, ignore_index: int) -> np.ndarray:
    """`image` (H, W, 3 in 0..1) with every non-background class tinted by its colour and ignored pixels grey."""
    out = image.copy()
    labelled = (mask > 0) & (mask != ignore_index) & (mask < len(colors))
    out[labelled] = (1 - ALPHA) * image[labelled] + ALPHA * colors[mask[labelled]]
    out[mask == ignore_index] = IGNORE_COLOR
    return out


def overlay_grid(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classes: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], ignore_index: int):
    """One row per sample: the image, the true mask over it, the predicted mask over it; a legend of the classes."""
    colors = palette(len(classes))
    rows = max(1, len(samples))
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (image, true, pred) in zip(axes, samples):
        pixels = (image.permute(1, 2, 0).numpy() * np.array(std) + np.array(mean)).clip(0, 1)
        panels = (pixels, overlay(pixels, true.numpy(), colors, ignore_index),
                  overlay(pixels, pred.numpy(), colors, ignore_index))
        for ax, panel in zip(row, panels):
            ax.imshow(panel)
    for ax, title in zip(axes[0], ("image", "true", "predicted")):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    # Below the panels; saving with bbox_inches="tight" makes room for it.
    handles = [Patch(color=colors[i], label=name) for i, name in enumerate(classes) if i > 0]
    fig.legend(handles=handles[:LEGEND_MAX], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False)
    return fig


def iou_bars(iou: dict[str, float]):
    """Horizontal bars of each class's IoU; classes absent from the validation set are marked instead of drawn."""
    names = list(iou)
    values = [0.0 if v != v else v for v in iou.values()]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(names) + 1.2))
    ax.barh(range(len(names)), values, color="tab:blue")
    for y, v in enumerate(iou.values()):
        ax.text(0.01 if v != v else min(v, 0.9) + 0.01, y, "absent" if v != v else f"{v:.3f}", va="center",
                fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    present = [v for v in iou.values() if v == v]
    ax.set_title(f"per-class IoU (mIoU {sum(present) / max(1, len(present)):.3f})")
    fig.tight_layout()
    return fig


def per_class_table(confusion: np.ndarray, classes: list[str], path: Path) -> Path:
    """CSV: each class's IoU, accuracy (recall) and its true and predicted pixel counts; empty where undefined."""
    cm = torch.as_tensor(confusion)
    iou = per_class_iou(cm).tolist()
    rows = []
    for i, name in enumerate(classes):
        true, predicted = int(cm[i].sum()), int(cm[:, i].sum())
        rows.append((name, fmt(iou[i]), fmt(int(cm[i, i]) / true) if true else "", true, predicted))
    return write_csv(path, ["class", "iou", "accuracy", "true_pixels", "predicted_pixels"], rows)
