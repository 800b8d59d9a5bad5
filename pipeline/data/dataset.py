"""What the runner asks of every dataset a task builds (`Task.build_data`): the files it reads, and augmentation that a
seed decides.

- `files()`: every file the split reads (images, masks, annotation files, pickled batches), for the data version a run
  records (pipeline/data/fingerprint.py). A dataset says what it read; nothing guesses from its attributes.
- `reseed(seed)`: the next item's random augmentation is a function of `seed` alone (pipeline/data/sampling.py), so a
  resumed run replays exactly what an uninterrupted one saw. Its `transform` is the albumentations pipeline of
  pipeline/data/transforms.py (or None: nothing random to reseed).
- `sampling_weights`: how often training draws each item relative to the others (data.balance: classification's
  sampler, detection's repeat factors), set by the task's `build_data`; None draws each item once per epoch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import albumentations as A
from torch.utils.data import Dataset


class TaskDataset(Dataset, ABC):
    transform: A.Compose | None
    sampling_weights: list[float] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def files(self) -> list[Path]:
        """The files this split reads, in a stable order, each once."""

    def reseed(self, seed: int) -> None:
        """Seed the augmentation of the next item read."""
        if self.transform is not None:
            self.transform.set_random_seed(seed)
