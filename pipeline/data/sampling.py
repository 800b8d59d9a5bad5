"""Training order and augmentation seeds as pure functions of (seed, epoch, index).

A resumed run then replays exactly what an uninterrupted one would have seen, whatever was in flight when it was
killed: the order of epoch e is a permutation seeded by (seed, e), and sample i of epoch e is augmented with a seed of
its own, not with a transform RNG whose state depends on how many images came before it (or on which worker drew
it). Data-parallel ranks take disjoint, equally long shards of the same permutation, like DistributedSampler.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data.dataset import TaskDataset


class EpochSampler(Sampler):
    """Shuffled indices of `size` items for the epoch set with `set_epoch` (1-based, as the engine counts).

    With `with_seeds`, yields `(index, augmentation_seed)` pairs for a `SeededDataset`; else plain indices. With
    `num_samples`, each epoch takes only that many items of its permutation (cached feature views).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 with_seeds: bool = True, num_samples: int | None = None) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_samples = min(size, num_samples or size)
        self.rank, self.world, self.with_seeds = rank, world, with_seeds
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        order = order[: self.num_samples]
        padded = order + order[: len(self) * self.world - len(order)]  # every rank gets the same number of steps
        for index in padded[self.rank::self.world]:
            yield (index, _mix(self.seed, self.epoch, index)) if self.with_seeds else index


class SeededDataset(Dataset):
    """Wraps a task's dataset (pipeline/data/dataset.py): item `(index, seed)` reseeds its augmentation before loading.
    A plain index loads without reseeding (validation, feature caching)."""

    def __init__(self, dataset: TaskDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            self.dataset.reseed(seed)
            return self.dataset[index]
        return self.dataset[item]


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])
