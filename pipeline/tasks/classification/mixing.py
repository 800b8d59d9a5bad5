"""Mixup and cutmix of training batches (train.mixup, train.cutmix), as timm's train script mixes a whole batch.

Each image is mixed with its partner in the reversed batch, by a ratio lam drawn from Beta(alpha, alpha):
- mixup (Zhang et al. 2018) blends the pixels, lam of the image and 1 - lam of its partner;
- cutmix (Yun et al. 2019) pastes a box of the partner covering about 1 - lam of the image, and lam becomes the share
  of the image left uncovered (the box is clipped at the borders).
The labels mix by the same lam into soft targets (N, C); the classification loss smooths them as it smooths plain
labels (model.label_smoothing). With both alphas set, each batch takes one of the two, at even odds.

Every draw is a function of (seed, epoch, batch): a resumed run mixes its batches as the uninterrupted run did.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Mixer:
    """Called by the engine on each training batch (images, labels) with the batch's key (epoch, index)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int) -> None:
        self.mixup, self.cutmix, self.num_classes, self.seed = mixup, cutmix, num_classes, seed

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], key: tuple[int, int]):
        images, labels = batch
        rng = np.random.default_rng([self.seed, *key])
        cut = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
        alpha = self.cutmix if cut else self.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if cut:
            images, lam = paste_box(images, partner, lam, rng)
        else:
            images = images * lam + partner * (1.0 - lam)
        onehot = F.one_hot(labels, self.num_classes).float()
        return images, onehot * lam + onehot.flip(0) * (1.0 - lam)


def paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator):
    """`images` with a box of `partner` pasted in, sides sqrt(1 - lam) of the image's, centred anywhere; and the share
    of each image left uncovered (the mixing ratio of the labels)."""
    height, width = images.shape[-2:]
    side = np.sqrt(1.0 - lam)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    half_h, half_w = int(height * side) // 2, int(width * side) // 2
    y1, y2 = max(cy - half_h, 0), min(cy + half_h, height)
    x1, x2 = max(cx - half_w, 0), min(cx + half_w, width)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
