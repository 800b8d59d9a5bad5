"""Linear probing on cached features: with the whole backbone frozen, its pooled features of every image are
computed once and the head trains on them, epochs after the first costing a head's forward and backward only.

Tasks that declare `caches_features` (pipeline/tasks/base.py) have models with `features(images) -> (N, D)` and an
`input_is_features` switch for `forward`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline import console
from pipeline.data.sampling import training_sampler
from pipeline.errors import UserError
from pipeline.tasks.base import Task
from pipeline.train.engine import StepSettings, autocast, to_device


def check(task: Task, random_train_transforms: bool, views: int) -> None:
    if not task.caches_features:
        raise UserError(f"finetune.cache_features: the {task.name} task cannot train on cached features; "
                        f"set finetune.cache_features=false")
    if random_train_transforms and views == 0:
        raise UserError("finetune.cache_features: data.train_transforms are random, so cached features would keep one "
                        "augmentation forever; use deterministic train transforms (e.g. Resize) or set "
                        "finetune.cached_views=N to cache N augmented views of each image")


@torch.no_grad()
def compute(model: nn.Module, loader: DataLoader, s: StepSettings, desc: str) -> TensorDataset:
    """Features and labels of every batch of `loader` (in its order), kept on the training device."""
    model.eval()
    feats, labels = [], []
    for batch in console.bar(loader, desc):
        images, target = to_device(batch, s.device, s.channels_last)
        with autocast(s.device, s.precision):
            feats.append(model.features(images).float())
        labels.append(target)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def cached_loaders(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, s: StepSettings,
                   views: int, seed: int, weights: list[float] | None = None) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached features. With `views` > 1, each epoch draws len(train) samples from all the views; with
    `weights` (the train set's sampling weights, data.balance), by those weights."""
    train_sets = [compute(model, _unshuffled(train_loader), s, f"caching train features ({v + 1}/{max(1, views)})")
                  for v in range(max(1, views))]
    train = TensorDataset(*(torch.cat(parts) for parts in zip(*(t.tensors for t in train_sets))))
    val = compute(model, val_loader, s, "caching val features")
    # The same order as training on images: a function of (seed, epoch), so resuming replays it.
    sampler = training_sampler(len(train), weights, seed, with_seeds=False, num_samples=len(train_sets[0]))
    return (DataLoader(train, batch_size=train_loader.batch_size, sampler=sampler, drop_last=train_loader.drop_last),
            DataLoader(val, batch_size=val_loader.batch_size))


def _unshuffled(loader: DataLoader) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers)
