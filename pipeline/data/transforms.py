"""Albumentations pipelines from YAML lists, with errors that point at the offending list entry.

A spec is a list of mappings, each naming one albumentations class and its keyword arguments:

    - {name: RandomResizedCrop, size: [64, 64], scale: [0.6, 1.0]}
    - {name: HorizontalFlip, p: 0.5}
    - {name: OneOf, p: 0.8, transforms: [{name: GaussianBlur}, {name: GaussNoise}]}

Composition classes (OneOf, SomeOf, Sequential, ...) take their children under `transforms`.
build_transforms appends Normalize(mean, std) and ToTensorV2, so the output image is a float CHW tensor.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

import albumentations as A
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform
from albumentations.pytorch import ToTensorV2
from pydantic import ValidationError

from pipeline.errors import UserError

# Transforms whose output depends only on the input when applied with probability 1. Anything else is treated as
# random, which errs on the safe side: a false "random" only disables feature caching, a false "deterministic"
# would silently cache one augmented view forever.
DETERMINISTIC = frozenset({
    "Resize", "LongestMaxSize", "SmallestMaxSize", "CenterCrop", "Crop", "PadIfNeeded", "Pad", "Normalize",
    "ToGray", "ToSepia", "ToRGB", "ToFloat", "FromFloat", "InvertImg", "Equalize", "NoOp", "ToTensorV2",
    "HorizontalFlip", "VerticalFlip", "Transpose",
})

# Where a spec entry's children live, for composition classes.
_CHILDREN_KEY = "transforms"
# Always the last two steps, so a spec must not contain them.
_APPENDED = ("Normalize", "ToTensorV2")


def build_transforms(
    spec: list[dict[str, Any]],
    *,
    field: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    bbox_params: A.BboxParams | None = None,
    additional_targets: dict[str, str] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """Build `spec` followed by Normalize(mean, std) and ToTensorV2; `field` names the spec in error messages.

    albumentations keeps its own random state, untouched by the global seeds: `seed` makes augmentation repeatable
    (loader workers reseed it per worker with `reseed_worker`).
    """
    if not isinstance(spec, list):
        raise UserError(f"{field}: expected a list of transforms like [{{name: HorizontalFlip, p: 0.5}}], "
                        f"got {type(spec).__name__}")
    steps = [_build_one(entry, f"{field}[{i}]") for i, entry in enumerate(spec)]
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(steps, bbox_params=bbox_params, additional_targets=additional_targets, seed=seed)


def reseed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: give each worker's transforms its own seed, derived from the loader's seed.

    Without it every worker would replay the same augmentations (each holds a copy of one seeded Compose).
    """
    import torch

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if isinstance(transform, A.Compose):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def is_random(spec: list[dict[str, Any]]) -> bool:
    """Whether applying `spec` twice to the same image can give different results."""
    return any(_entry_is_random(entry) for entry in spec)


def transform_names() -> list[str]:
    """Names of every albumentations transform and composition a spec may use."""
    return sorted(_registry())


def transform_class(name: Any) -> type | None:
    """The albumentations class a spec entry's `name` stands for; None for an unknown name."""
    return _registry().get(name) if isinstance(name, str) else None


@functools.cache
def _registry() -> dict[str, type]:
    classes = {name: getattr(A, name) for name in dir(A)}
    classes["ToTensorV2"] = ToTensorV2
    abstract = {"BasicTransform", "DualTransform", "ImageOnlyTransform", "BaseCompose", "Transform3D"}
    return {
        name: cls
        for name, cls in classes.items()
        if inspect.isclass(cls) and issubclass(cls, (BasicTransform, BaseCompose)) and name not in abstract
    }


def _build_one(entry: Any, where: str) -> BasicTransform | BaseCompose:
    cls, kwargs = _resolve(entry, where)
    if cls.__name__ in _APPENDED:
        # A second Normalize would normalise twice and silently wreck the inputs.
        raise UserError(f"{where}: {cls.__name__} is added automatically at the end (from the model's mean/std); "
                        "remove it from the list")
    if issubclass(cls, BaseCompose):
        children = kwargs.pop(_CHILDREN_KEY, None)
        if not isinstance(children, list) or not children:
            raise UserError(f"{where}: {cls.__name__} needs a non-empty list under '{_CHILDREN_KEY}'")
        kwargs[_CHILDREN_KEY] = [_build_one(child, f"{where}.{_CHILDREN_KEY}[{j}]") for j, child in enumerate(children)]
    _check_arguments(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
        raise UserError(f"{where}: invalid arguments for {cls.__name__}: {_reason(err)}") from err


def _resolve(entry: Any, where: str) -> tuple[type, dict[str, Any]]:
    """Split a spec entry into its albumentations class and a fresh copy of its keyword arguments."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise UserError(f"{where}: expected a mapping with a 'name' key, like {{name: HorizontalFlip, p: 0.5}}; "
                        f"got {entry!r}")
    kwargs = dict(entry)
    name = kwargs.pop("name")
    cls = _registry().get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), transform_names(), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see albumentations' documentation for the names"
        raise UserError(f"{where}: unknown transform '{name}'; {hint}")
    return cls, kwargs


def _check_arguments(cls: type, kwargs: dict[str, Any], where: str) -> None:
    # albumentations only warns about unknown arguments, so a misspelt 'scael' would silently use the default.
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"{where}: {cls.__name__} has no argument(s) {', '.join(unknown)}; "
                        f"valid arguments: {', '.join(accepted)}")


def _reason(err: Exception) -> str:
    """albumentations' complaint in one line; it wraps pydantic's multi-line ValidationError in a ValueError."""
    validation = err if isinstance(err, ValidationError) else err.__cause__
    if not isinstance(validation, ValidationError):
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    parts = []
    for problem in validation.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "arguments"
        got = "" if problem["type"] == "missing" else f" (got {problem.get('input')!r})"
        parts.append(f"{location}: {problem['msg']}{got}")
    return "; ".join(parts)


def _entry_is_random(entry: dict[str, Any]) -> bool:
    name = entry.get("name")
    cls = _registry().get(name)
    if cls is None or name not in DETERMINISTIC and not issubclass(cls, BaseCompose):
        return True
    if _probability(cls, entry) < 1.0:
        return True
    if issubclass(cls, BaseCompose):
        # Only an all-children, in-order composition is deterministic; OneOf, SomeOf, RandomOrder pick at random.
        if name not in ("Sequential", "Compose"):
            return True
        return is_random(entry.get(_CHILDREN_KEY, []))
    return False


def _probability(cls: type, entry: dict[str, Any]) -> float:
    if "p" in entry:
        return float(entry["p"])
    default = inspect.signature(cls.__init__).parameters.get("p")
    return 1.0 if default is None or default.default is inspect.Parameter.empty else float(default.default)
