"""data.balance for classification: what to do when a few classes hold most of the training images.

- `sampler`: training draws every class equally often (pipeline/data/sampling.py `class_balanced`), with replacement,
  as many images per epoch as the set holds, so the number of steps per epoch stays the same.
- `loss`: every image is drawn once per epoch, and each class's cross-entropy is weighted by its inverse frequency,
  w_c = N / (C * n_c) for C classes holding N training images, n_c of class c (scikit-learn's "balanced" weights).

Why inverse frequency and not the effective number of samples (Cui et al., CVPR 2019, w_c proportional to
(1 - beta) / (1 - beta^n_c)): the effective number discounts large classes whose images overlap one another, and it
departs from n_c only once a class holds on the order of 1 / (1 - beta) images; with the paper's beta of 0.999-0.9999
that is thousands. The data this option is for holds tens to a few hundred images per class, where both give the same
weights up to a few percent, and inverse frequency has no beta to tune. Its weights average 1 over the training images
(sum_c n_c w_c = N), so the loss keeps its scale and a learning rate found without them (lr-find) still fits; each
class then adds the same total weight to an epoch's loss, as the balanced sampler does in expectation, without
repeating the rare images.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Training images per class, in label order."""
    counts = Counter(labels)
    return [counts.get(c, 0) for c in range(num_classes)]


def loss_weights(counts: Sequence[int]) -> list[float]:
    """N / (C * n_c) per class (classes without training images get 0: no image can carry their loss)."""
    present = [n for n in counts if n > 0]
    total, classes = sum(present), len(present)
    return [total / (classes * n) if n > 0 else 0.0 for n in counts]
