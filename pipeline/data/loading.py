"""What training and inference loaders share: how many worker processes decode images, and seeding every RNG."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def auto_workers(device: torch.device) -> int:
    """Loader worker processes for `data.num_workers: auto`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # On CPU the model needs every core; a worker pays off only with cores to spare.
    if device.type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return min(8, max(1, cores - 1))


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
