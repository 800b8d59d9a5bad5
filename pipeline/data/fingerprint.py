"""A digest of the files a dataset split reads, by name and size: the data version a run records.

Which files: what the split's dataset says it reads (`TaskDataset.files`: images, masks, annotation files, pickled
batches, pairs lists). Cheap on purpose: one `stat` per file, no image bytes read, so a changed, added or removed file
changes the digest but re-encoding an image to the same size does not.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def digest(paths: Iterable[Path], root: Path, items: int) -> str:
    """Eight hex digits (MLflow's own digest length) over each file's path relative to `root` and size, and the item
    count. Relative paths keep the digest of a copied or moved dataset; the count tells train and val apart where
    both come from the same files."""
    root = os.path.abspath(root)  # not resolve(): that costs a system call per path component, per file
    lines = sorted(f"{_relative(os.path.abspath(p), root)}\t{os.stat(p).st_size}" for p in dict.fromkeys(paths))
    return hashlib.sha256("\n".join([str(items), *lines]).encode()).hexdigest()[:8]


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path
