"""What files a dataset split reads, and a digest of their names and sizes: the data version a run records.

Cheap on purpose: one `stat` per file, no image bytes read, so a changed, added or removed file changes the digest but
re-encoding an image to the same size does not. Files a dataset does not list are not covered: the caller adds the
ones it knows (detection's annotation json); an LFW-layout pairs.txt is left out.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The per-item lists the project's datasets keep: (path, label) samples, detection records, image and mask paths,
# (verification set, index) pairs.
_ITEM_LISTS = ("samples", "records", "images", "masks")
_FILE_ATTRS = ("json_path",)  # one file a whole split reads (COCO-format masks)


def files(dataset: Any) -> list[Path]:
    """The files `dataset` reads, as far as it lists them, in order and without repeats; empty for in-memory sets."""
    found: list[Path] = []
    for name in _ITEM_LISTS:
        items = getattr(dataset, name, None)
        if isinstance(items, (list, tuple)):  # not CIFAR's numpy arrays: those are pixels, not files
            found += [p for p in map(_path_of, items) if p is not None]
    found += [Path(p) for p in (getattr(dataset, a, None) for a in _FILE_ATTRS) if isinstance(p, (str, Path))]
    return list(dict.fromkeys(found))


def _path_of(item: Any) -> Path | None:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int) and hasattr(item[0], "images"):
        owner, index = item  # face verification: (set, index); a .bin set holds its images as bytes in one file
        image = owner.images[index]
        return Path(image) if isinstance(image, (str, Path)) else Path(owner.source)
    if isinstance(item, tuple) and item:
        item = item[0]  # (path, label)
    if isinstance(item, (str, Path)):
        return Path(item)
    path = getattr(item, "path", None)  # detection records
    return Path(path) if isinstance(path, (str, Path)) else None


def digest(paths: Iterable[Path], root: Path, items: int) -> str:
    """Eight hex digits (MLflow's own digest length) over each file's path relative to `root` and size, and the item
    count. Relative paths keep the digest of a copied or moved dataset; the count tells train and val apart where
    both come from the same files (CIFAR's batches)."""
    root = os.path.abspath(root)  # not resolve(): that costs a system call per path component, per file
    lines = sorted(f"{_relative(os.path.abspath(p), root)}\t{os.stat(p).st_size}" for p in paths)
    return hashlib.sha256("\n".join([str(items), *lines]).encode()).hexdigest()[:8]


def tree(root: Path) -> list[Path]:
    """Every file under `root`: the fallback for a dataset that lists no files of its own (CIFAR's pickles)."""
    return [p for p in Path(root).rglob("*") if p.is_file()] if Path(root).is_dir() else [Path(root)]


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path
