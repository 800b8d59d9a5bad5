"""Classification datasets: ImageFolder trees and the CIFAR-10/100 python pickles, as (CHW float32 tensor, label).

ImageFolder layouts, checked in this order:
- root/train/<class>/... and root/val/<class>/...  (val classes must be a subset of train classes)
- root/train/<class>/... alone, or root/<class>/... : val_fraction of each class is split off for validation
CIFAR: root holds (or is) the extracted `cifar-10-batches-py` / `cifar-100-python` folder; the official test
batch is the validation set and val_fraction is not used (the files are read by cifar.py).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.dataset import TaskDataset
from pipeline.data.images import IMAGE_EXTENSIONS, read_rgb
from pipeline.errors import UserError
from pipeline.tasks.classification.cifar import cifar_files, find_cifar_folder, load_cifar

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "cifar10", "cifar100")

# An albumentations Compose (or anything called as transform(image=hwc_uint8) -> {"image": tensor}).
Transform = Callable[..., dict[str, Any]]
Sample = tuple[Path, int]

# How many bad file names a skip message lists before "...".
_NAMES_SHOWN = 5


class ImageFolderDataset(TaskDataset):
    """Images listed as (path, label) pairs, decoded with read_rgb and passed through an albumentations transform.

    With `cache_bytes`, decoded images are kept in memory until they fill that many bytes, so later epochs skip
    reading and decoding them (on 2 CPU cores decoding is 12 ms of each 32-image quickstart batch). Each loader
    worker process holds its own cache.
    """

    def __init__(self, samples: list[Sample], classes: list[str], transform: Transform | None = None, *,
                 cache_bytes: int = 0) -> None:
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.cache_left = cache_bytes
        self.cache: dict[int, np.ndarray] = {}

    @classmethod
    def from_folder(
        cls,
        root: Path,
        transform: Transform | None = None,
        *,
        skip_bad_images: bool = False,
    ) -> ImageFolderDataset:
        """All images of `root/<class>/`, classes sorted by name."""
        samples, classes = scan_image_folder(Path(root))
        if skip_bad_images:
            samples = drop_bad_images(samples, Path(root), classes)
        return cls(samples, classes, transform)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        cached = self.cache.get(index)
        if cached is None:
            image = read_rgb(path)
            if image.nbytes <= self.cache_left:
                self.cache[index] = image.copy()  # the copy: a transform may write into the array it is given
                self.cache_left -= image.nbytes
        else:
            image = cached.copy()
        return _apply(self.transform, image), label

    def files(self) -> list[Path]:
        return [path for path, _ in self.samples]


class CifarDataset(TaskDataset):
    """CIFAR images held in memory as an (N, 32, 32, 3) uint8 array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform: Transform | None = None,
                 paths: list[Path] | None = None) -> None:
        self.images = images
        self.labels = labels
        self.classes = classes
        self.transform = transform
        self.paths = paths or []  # the pickled batches (and class list) the arrays came from

    @classmethod
    def from_files(
        cls, root: Path, fmt: str, *, train: bool, transform: Transform | None = None, download: bool = False
    ) -> CifarDataset:
        """The train (or test) split of CIFAR-10 (`fmt="cifar10"`) or CIFAR-100 (`fmt="cifar100"`) under `root`."""
        folder = find_cifar_folder(Path(root), fmt, download=download)
        images, labels, classes = load_cifar(folder, fmt, train=train)
        return cls(images, labels, classes, transform, cifar_files(folder, fmt, train=train))

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _apply(self.transform, self.images[index]), int(self.labels[index])

    def files(self) -> list[Path]:
        return list(self.paths)


def build_datasets(
    root: Path,
    fmt: str,
    *,
    val_fraction: float,
    seed: int,
    train_transform: Transform | None,
    val_transform: Transform | None,
    skip_bad_images: bool,
    download: bool,
    cache_bytes: int = 0,
) -> tuple[Dataset, Dataset, list[str]]:
    """Train and val datasets of `fmt` ("imagefolder", "cifar10", "cifar100") under `root`, and the class names.
    ImageFolder datasets keep up to `cache_bytes` of decoded images each in memory (CIFAR is in memory anyway)."""
    root = Path(root)
    if fmt in ("cifar10", "cifar100"):
        train = CifarDataset.from_files(root, fmt, train=True, transform=train_transform, download=download)
        val = CifarDataset.from_files(root, fmt, train=False, transform=val_transform)
        return train, val, train.classes
    if fmt != "imagefolder":
        raise UserError(f"data.format: unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    train_samples, val_samples, classes = _image_folder_splits(root, val_fraction, seed, skip_bad_images)
    return (
        ImageFolderDataset(train_samples, classes, train_transform, cache_bytes=cache_bytes),
        ImageFolderDataset(val_samples, classes, val_transform, cache_bytes=cache_bytes),
        classes,
    )


# ---------------------------------------------------------------------------------------------------- ImageFolder


def scan_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """(path, label) for every image under root/<class>/ (searched recursively), and the sorted class names.

    With `classes` given (the train classes, when scanning a val folder), labels follow that list and a class
    folder outside it is an error; classes without a folder here are allowed.
    """
    if not root.is_dir():
        raise UserError(f"data.root: folder '{root}' does not exist; generate demo data with "
                        "'pipeline data synth --out data/shapes' or point data.root at an ImageFolder")
    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise UserError(f"data.root: folder '{root}' has no class subfolders; expected {root}/<class>/<image> "
                        "(or train/ and val/ folders of classes)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"data.root: '{root}' has class folders {unknown} that the train folder lacks; "
                        "train and val need the same class folders")
    samples: list[Sample] = []
    for name in found:
        images = _list_images(root / name)
        if not images:
            raise UserError(f"data.root: class folder '{root / name}' holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        samples += [(path, classes.index(name)) for path in images]
    return samples, classes


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off round(val_fraction * n) images of each class (at least 1, never all) with a seeded shuffle.

    The shuffle runs over samples sorted by path, so the split depends on the seed and the files, not on listing
    order.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: (s[1], str(s[0]))):
        by_class.setdefault(sample[1], []).append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        chosen = set(order[:n_val].tolist())
        val += [sample for i, sample in enumerate(members) if i in chosen]
        train += [sample for i, sample in enumerate(members) if i not in chosen]
    return train, val


def find_bad_images(paths: list[Path]) -> list[Path]:
    """Files that read_rgb cannot decode.

    Full decoding is the only check that catches truncated JPEGs (PIL's verify() does not). It costs about 0.3 ms
    per 64 px PNG and a few ms per photo; PIL releases the GIL while decoding, so threads spread it over the cores.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        readable = list(pool.map(_is_readable, paths))
    return [path for path, ok in zip(paths, readable) if not ok]


def _is_readable(path: Path) -> bool:
    try:
        read_rgb(path)
    except UserError:
        return False
    return True


def drop_bad_images(samples: list[Sample], root: Path, classes: list[str]) -> list[Sample]:
    """`samples` without the undecodable files; logs how many were skipped and names the first few."""
    bad = set(find_bad_images([path for path, _ in samples]))
    if not bad:
        return samples
    shown = ", ".join(str(path) for path in sorted(bad)[:_NAMES_SHOWN])
    more = ", ..." if len(bad) > _NAMES_SHOWN else ""
    log.warning("skipped %d unreadable image(s) under %s (data.skip_bad_images): %s%s", len(bad), root, shown, more)
    kept = [sample for sample in samples if sample[0] not in bad]
    counts = Counter(label for _, label in kept)
    emptied = [classes[label] for label in sorted({label for _, label in samples}) if counts[label] == 0]
    if emptied:
        raise UserError(f"data.root: every image of class(es) {emptied} under '{root}' is unreadable; "
                        "replace the files or remove those class folders")
    return kept


def _image_folder_splits(
    root: Path, val_fraction: float, seed: int, skip_bad_images: bool
) -> tuple[list[Sample], list[Sample], list[str]]:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction: {val_fraction} is outside [0, 1); use e.g. 0.2")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = root / "val"
    has_val_folder = val_root.is_dir() and train_root != root
    if not has_val_folder and val_fraction == 0:
        raise UserError(f"data.val_fraction: '{root}' has no val/ folder, so set data.val_fraction (e.g. 0.2) "
                        f"to hold out part of each class, or add {val_root}/<class>/ images")
    train, classes = scan_image_folder(train_root)
    if len(classes) < 2:
        # Usually data.root points one level too high (e.g. at the synth output instead of its classification/).
        raise UserError(f"data.root: '{train_root}' has a single class folder '{classes[0]}'; classification needs "
                        f"at least two, so point data.root at the folder that holds the class folders")
    # Bad files go before splitting, so the split is made over images that can actually be used.
    if skip_bad_images:
        train = drop_bad_images(train, train_root, classes)
    if has_val_folder:
        val, _ = scan_image_folder(val_root, classes)
        if skip_bad_images:
            val = drop_bad_images(val, val_root, classes)
    else:
        train, val = stratified_split(train, val_fraction, seed)
    missing = sorted(set(classes) - {classes[label] for _, label in val})
    if missing:
        log.warning("validation set has no images of class(es) %s; their accuracy is not measured", missing)
    return train, val, classes


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _apply(transform: Transform | None, image: np.ndarray) -> torch.Tensor:
    if transform is None:
        # No transform: plain 0..1 CHW floats, so the dataset still honours its (tensor, label) contract.
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
    return transform(image=image)["image"]
