"""Face datasets: identity folders for training, and verification pairs from LFW `pairs.txt` files or insightface
`.bin` files.

Training: `train_root/<identity>/<image>`, one folder per identity (CASIA-WebFace or MS1M exported to images).
Verification set `<name>` under the data root, whichever exists:
- `<name>.bin`: insightface's pickle of `(list of encoded images, list of is-same flags)`, images 2k and 2k+1 forming
  pair k. Read with an unpickler that refuses every global, so a crafted file cannot run code.
- `<name>/pairs.txt` with images `<name>/<person>/<person>_<NNNN>.<ext>`: LFW's format, an optional header line
  (`10<TAB>300`), matched lines `person i j` and mismatched lines `person1 i person2 j` (1-based image numbers).

Each verification item is one image or its horizontal flip, labelled with its position in the dataset, so the
evaluator can sum the two embeddings of every image (and cached features line up the same way).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pipeline.data import safe_pickle
from pipeline.data.dataset import TaskDataset
from pipeline.data.images import IMAGE_EXTENSIONS, read_rgb, to_rgb_array
from pipeline.errors import UserError

log = logging.getLogger(__name__)

Transform = Callable[..., dict[str, Any]]
# Cross-validation folds of the standard protocol; a set needs at least this many pairs.
FOLDS = 10


# ---------------------------------------------------------------------------------------------------- identities


def train_dir_problem(root: Path) -> str | None:
    if not root.is_dir():
        return (f"data.train_dir: folder '{root}' does not exist; point data.root/data.train_dir at identity "
                "folders (<identity>/<image>), or set data.synth_if_missing: true for the synthetic ones")
    return None


def scan_identities(root: Path, min_images: int) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) of every image under root/<identity>/, dropping identities with fewer than `min_images`."""
    problem = train_dir_problem(root)
    if problem:
        raise UserError(problem)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"data.train_dir: '{root}' has no identity folders; expected {root}/<identity>/<image>")
    kept: list[tuple[str, list[Path]]] = []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise UserError(f"data.train_dir: identity folder '{folder}' holds no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        if len(images) >= min_images:
            kept.append((folder.name, images))
    dropped = len(folders) - len(kept)
    if dropped:
        log.warning("dropped %d of %d identities with fewer than %d images (data.min_images_per_identity)",
                    dropped, len(folders), min_images)
    if len(kept) < 2:
        raise UserError(f"data.min_images_per_identity={min_images} leaves {len(kept)} identity under '{root}'; "
                        "training needs at least 2: lower it or add images")
    samples = [(path, label) for label, (_, images) in enumerate(kept) for path in images]
    return samples, [name for name, _ in kept]


class IdentityDataset(TaskDataset):
    """Training images as (CHW float tensor, identity label)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(image=read_rgb(path))["image"], label

    def files(self) -> list[Path]:
        return [path for path, _ in self.samples]


# -------------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class PairSet:
    """One verification set: its images (files, or encoded bytes from a .bin) and pairs of indices into them."""

    name: str
    source: Path
    images: list[Path] | list[bytes]
    pairs: np.ndarray  # (n, 2) int
    issame: np.ndarray  # (n,) bool


def load_verification(root: Path, name: str) -> PairSet:
    """Set `name` under `root`: `<name>.bin` if present, else `<name>/pairs.txt` with its image folders."""
    binary, pairs_file = root / f"{name}.bin", root / name / "pairs.txt"
    if binary.is_file():
        pair_set = read_bin(binary, name)
    elif pairs_file.is_file():
        pair_set = read_pairs(pairs_file, root / name, name)
    else:
        raise UserError(f"data.verification: set '{name}' not found: expected '{binary}' (insightface .bin) or "
                        f"'{pairs_file}' (LFW pairs with its image folders)")
    if len(pair_set.issame) < FOLDS or pair_set.issame.all() or not pair_set.issame.any():
        raise UserError(f"data.verification: '{pair_set.source}' has {len(pair_set.issame)} pairs; the 10-fold "
                        f"protocol needs at least {FOLDS}, both matched and mismatched")
    return pair_set


def read_pairs(path: Path, image_root: Path, name: str) -> PairSet:
    """An LFW pairs.txt: matched lines `person i j`, mismatched lines `person1 i person2 j`, optional header."""
    index: dict[Path, int] = {}
    pairs, issame = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or (number == 1 and len(fields) <= 2 and all(f.isdigit() for f in fields)):
            continue  # blank line, or the header: "folds<TAB>pairs per fold" (or LFW's dev-set "pairs")
        try:
            if len(fields) == 3:
                people, numbers = (fields[0], fields[0]), (int(fields[1]), int(fields[2]))
            elif len(fields) == 4:
                people, numbers = (fields[0], fields[2]), (int(fields[1]), int(fields[3]))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"{path}:{number}: cannot parse '{line.strip()}'; expected 'person i j' (matched) or "
                            "'person1 i person2 j' (mismatched) with image numbers") from None
        ids = []
        for person, n in zip(people, numbers):
            image = _pair_image(image_root, person, n, path, number)
            ids.append(index.setdefault(image, len(index)))
        pairs.append(ids)
        issame.append(len(fields) == 3)
    return PairSet(name, path, list(index), np.array(pairs, dtype=np.int64).reshape(-1, 2),
                   np.array(issame, dtype=bool))


def _pair_image(image_root: Path, person: str, number: int, pairs_file: Path, line: int) -> Path:
    stem = image_root / person / f"{person}_{number:04d}"
    for ext in sorted(IMAGE_EXTENSIONS):
        if stem.with_suffix(ext).is_file():
            return stem.with_suffix(ext)
    raise UserError(f"{pairs_file}:{line}: pair image '{stem}.jpg' is missing (no {stem.name}.* with an image "
                    "extension); restore the image or remove the pair")


def read_bin(path: Path, name: str) -> PairSet:
    """An insightface `.bin`: `(list of 2n encoded images, list of n is-same flags)`."""
    # Python 2 wrote insightface's files: its str objects (the encoded images) must stay bytes.
    content = safe_pickle.load(path, allowed=safe_pickle.CODECS_ENCODE, encoding="bytes",
                               what=f"verification set '{path}'", remedy="use the official file")
    expected = "a pair (list of encoded images, list of is-same flags) with two images per flag"
    if not (isinstance(content, (tuple, list)) and len(content) == 2 and isinstance(content[0], (list, tuple))
            and isinstance(content[1], (list, tuple))):
        raise UserError(f"'{path}' holds a {type(content).__name__}, not {expected}")
    images, flags = content
    if len(images) != 2 * len(flags) or not all(isinstance(b, (bytes, bytearray)) for b in images) \
            or not all(isinstance(f, (bool, int)) for f in flags):
        raise UserError(f"'{path}' holds {len(images)} items and {len(flags)} flags, not {expected}")
    pairs = np.arange(len(images), dtype=np.int64).reshape(-1, 2)
    return PairSet(name, path, [bytes(b) for b in images], pairs, np.array(flags, dtype=bool))


class VerificationDataset(TaskDataset):
    """Every image of the verification sets and its horizontal flip, as (CHW float tensor, item index).

    Item 2i is image i and item 2i + 1 its flip, counting images across the sets in order.
    """

    def __init__(self, sets: list[PairSet], transform: Transform) -> None:
        self.sets = sets
        self.images = [(s, i) for s in sets for i in range(len(s.images))]
        self.transform = transform

    def __len__(self) -> int:
        return 2 * len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pair_set, i = self.images[index // 2]
        image = self.transform(image=_decode(pair_set, i))["image"]
        return (image.flip(-1) if index % 2 else image), index

    def files(self) -> list[Path]:
        """Each set's pairs file (or .bin, which holds its images too) and image files."""
        return [path for s in self.sets for path in (s.source, *(p for p in s.images if isinstance(p, Path)))]


def _decode(pair_set: PairSet, i: int) -> np.ndarray:
    item = pair_set.images[i]
    if isinstance(item, Path):
        return read_rgb(item)
    try:
        with Image.open(io.BytesIO(item)) as img:
            img.load()
            return to_rgb_array(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"'{pair_set.source}': image {i} is corrupt or not an image ({err}); use the official "
                        "file") from err
