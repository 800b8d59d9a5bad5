"""data.balance: repeat_factor for detection, LVIS's repeat-factor sampling (Gupta et al., CVPR 2019; detectron2's
RepeatFactorTrainingSampler).

A category in a fraction f_c of the training images gets the repeat factor r_c = max(1, sqrt(t / f_c)) for the threshold
t (data.repeat_threshold), and an image the largest factor among the categories of its boxes (1 without boxes). LVIS
repeats image i r_i times per epoch (stochastically rounded), so an epoch grows; here an epoch keeps its number of
images and steps, and draws them with replacement with probability proportional to r_i (pipeline/data/sampling.py):
the same proportions between images, and the learning-rate schedule keeps its length.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.tasks.detection.data import ImageRecord


def images_per_category(records: list[ImageRecord], num_categories: int) -> list[int]:
    """How many training images hold a (non-crowd) box of each category, in label order (labels 1..K)."""
    counts = np.zeros(num_categories, dtype=np.int64)
    for rec in records:
        present = np.unique(rec.labels[~rec.crowd])
        counts[present - 1] += 1
    return counts.tolist()


def repeat_factors(records: list[ImageRecord], counts: list[int], threshold: float) -> list[float]:
    """r_i per image: the largest r_c = max(1, sqrt(threshold / f_c)) of its categories (1 without boxes)."""
    per_category = [max(1.0, math.sqrt(threshold * len(records) / n)) if n else 1.0 for n in counts]
    return [max((per_category[label - 1] for label in rec.labels[~rec.crowd]), default=1.0) for rec in records]
