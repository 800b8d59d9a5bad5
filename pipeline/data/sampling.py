"""Training order and augmentation seeds as pure functions of (seed, epoch, index).

A resumed run then replays exactly what an uninterrupted one would have seen, whatever was in flight when it was
killed: the order of epoch e is a permutation seeded by (seed, e), and sample i of epoch e is augmented with a seed of
its own, not with a transform RNG whose state depends on how many images came before it (or on which worker drew
it). Data-parallel ranks take disjoint, equally long shards of the same permutation, like DistributedSampler.

`WeightedSampler` draws rare items more often (data.balance): as many draws per epoch as the plain order has items, so
an epoch keeps its number of steps, with replacement, each item with probability proportional to its weight; the draws
are a function of (seed, epoch) too, and an item drawn twice in one epoch gets two augmentations.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

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

    def order(self) -> list[int]:
        """This epoch's items, before they are shared out among ranks."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator)[: self.num_samples].tolist()

    def item_seed(self, position: int, index: int) -> int:
        """The augmentation seed of item `index`, drawn at `position` of this epoch's order."""
        return _mix(self.seed, self.epoch, index)

    def __iter__(self):
        order = self.order()
        padded = order + order[: len(self) * self.world - len(order)]  # every rank gets the same number of steps
        for position in range(self.rank, len(padded), self.world):
            index = padded[position]
            yield (index, self.item_seed(position, index)) if self.with_seeds else index


class WeightedSampler(EpochSampler):
    """`num_samples` (default: every item's count) draws with replacement per epoch, item i with probability
    weights[i] / sum(weights): the same steps per epoch as an EpochSampler, rare items more often."""

    def __init__(self, weights: Sequence[float], seed: int, rank: int = 0, world: int = 1, with_seeds: bool = True,
                 num_samples: int | None = None) -> None:
        super().__init__(len(weights), seed, rank=rank, world=world, with_seeds=with_seeds, num_samples=num_samples)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()

    def item_seed(self, position: int, index: int) -> int:
        return _mix(self.seed, self.epoch, index, position)  # a repeat gets an augmentation of its own


def class_balanced(labels: Sequence[int]) -> list[float]:
    """Weights that draw every class equally often: 1 / (images of the item's class)."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def training_sampler(size: int, weights: Sequence[float] | None, seed: int, rank: int = 0, world: int = 1,
                     with_seeds: bool = True, num_samples: int | None = None) -> EpochSampler:
    """The training order: shuffled once per epoch, or with `weights` (a dataset's `sampling_weights`) drawn by them.
    `size` items (cached feature views: `num_samples` of them per epoch)."""
    if weights is None:
        return EpochSampler(size, seed, rank=rank, world=world, with_seeds=with_seeds, num_samples=num_samples)
    if len(weights) != size:
        weights = list(weights) * (size // len(weights))  # one weight per image, repeated for each cached view
    return WeightedSampler(weights, seed, rank=rank, world=world, with_seeds=with_seeds, num_samples=num_samples)


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
