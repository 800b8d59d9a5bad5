"""The start-of-run checks on the transforms in force: validation must not move what a metric is scored on, and the
train and val transforms must give the images the model is configured for.

Both catch runs that would otherwise "succeed" with a wrong result: a flip or crop in detection validation shifts every
predicted box against the annotation file's (a perfect detector scored 0.05-0.50 mAP), and a pixel size left in a spec
after `data.image_size` changed trains on one size and validates on another, with no error. Each task declares its
rules (`fixed_input_size`, `val_geometry`, `val_transform_problem` in pipeline/tasks/base.py); this module applies them.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import ImageOnlyTransform

from pipeline.config.sections import DataConfig
from pipeline.data.dataset import TaskDataset
from pipeline.data.transforms import transform_class
from pipeline.errors import UserError


class TransformRules(Protocol):
    """What these checks ask of a task: its transform rules, as the task contract declares them
    (pipeline/tasks/base.py)."""

    name: str
    fixed_input_size: bool

    def specs(self, data: DataConfig) -> tuple[list[dict], list[dict]]: ...

    def val_transform_problem(self, entry: dict, data: DataConfig) -> str | None: ...

# The spatial transforms that only rescale: an evaluator maps predictions back by each axis' scale.
RESIZES = frozenset({"Resize", "LongestMaxSize", "SmallestMaxSize"})
_CHILDREN_KEY = "transforms"


def check_val_spec(task: TransformRules, data: DataConfig) -> None:
    """Refuse a validation transform that would corrupt `task`'s metric, naming its place in data.val_transforms.

    Pixel-level transforms (albumentations' ImageOnlyTransform: colour, blur, noise) never move anything; every other
    transform is spatial and must pass `task.val_transform_problem`. Compositions are checked child by child. Malformed
    entries are left to build_transforms, which names them.
    """
    _, spec = task.specs(data)
    for where, entry in _entries(spec, "data.val_transforms"):
        cls = transform_class(entry["name"])
        if cls is None or issubclass(cls, (BaseCompose, ImageOnlyTransform)):
            continue
        problem = task.val_transform_problem(entry, data)
        if problem:
            raise UserError(f"{where}: {problem}")


def check_sizes(task: TransformRules, train: TaskDataset, val: TaskDataset, config: DataConfig, seed: int) -> None:
    """Pass the first training and the first validation image through their transforms; refuse sizes that differ from
    each other or from data.image_size, naming both specs and the sizes they gave.

    Tasks without `fixed_input_size` (detection: the model resizes each image) are not checked.
    """
    if not task.fixed_input_size or len(train) == 0 or len(val) == 0:
        return
    train, val = _first_image_size(train, seed), _first_image_size(val, seed)
    size = config.image_size
    if train is None or val is None or train == val == (size, size):  # (None: no image tensor to measure)
        return
    defaults = {name for name in ("train_transforms", "val_transforms") if getattr(config, name) is None}
    named = {name: f"data.{name}" + (f" (the {task.name} default)" if name in defaults else "")
             for name in ("train_transforms", "val_transforms")}
    raise UserError(f"{named['train_transforms']} give {_wxh(train)} images and {named['val_transforms']} give "
                    f"{_wxh(val)}, but the model is configured for data.image_size={size} ({size}x{size}); make both "
                    "produce data.image_size (write ${data.image_size} in the specs instead of pixel numbers)")


def _first_image_size(dataset: TaskDataset, seed: int) -> tuple[int, int] | None:
    """(height, width) of item 0's image after its transforms; None where the item holds no image tensor.

    The probe draws from the transform's random state, so it is reseeded afterwards with the seed it was built with
    (Task.transforms): augmentations read with plain indices (feature caching) stay those of a run without the probe.
    """
    item = dataset[0]
    dataset.reseed(seed)
    image = item[0] if isinstance(item, (tuple, list)) else item
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) and image.dim() >= 2 else None


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _entries(spec: Any, where: str) -> Iterator[tuple[str, dict]]:
    """(place, entry) for each named entry of a spec, compositions' children included."""
    if not isinstance(spec, list):
        return
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        yield f"{where}[{i}]", entry
        yield from _entries(entry.get(_CHILDREN_KEY), f"{where}[{i}].{_CHILDREN_KEY}")
