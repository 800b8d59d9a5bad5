"""Segmentation datasets: (image, class-index mask) pairs from three layouts, as (CHW float tensor, HW int64 mask).

- `voc`: Pascal VOC 2012 (`JPEGImages/`, `SegmentationClass/` palette PNGs, `ImageSets/Segmentation/<split>.txt`).
- `folder`: `images/<split>/` and `masks/<split>/<same stem>.png` (class-index PNGs), class names from
  `data.classes` or `classes.txt` in the root (one per line, index 0 first).
- `coco`: a COCO instances json (`annotations/<split>.json` or `annotations/instances_<split>.json`) with images in
  `images/<split>/` or `<split>/`. Polygons and RLE become class masks through pycocotools: category ids map to
  labels 1..K in id order (0 is background), and where instances overlap the smaller one is painted on top (larger
  areas first, ties by annotation id), so every object keeps its pixels and the result does not depend on file order.
  Crowd regions (iscrowd, usually RLE) are painted with their class like any other instance.

Masks hold class indices; `ignore_index` (VOC's 255 border) marks pixels that count nowhere. Problems a user can fix
(missing files, a class index out of range, an image and mask of different sizes) are one-line `UserError`s.
"""
from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.dataset import TaskDataset
from pipeline.data.images import IMAGE_EXTENSIONS, inside, read_rgb
from pipeline.errors import UserError

FORMATS = ("voc", "folder", "coco")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

# An albumentations Compose called as transform(image=hwc_uint8, mask=hw) -> {"image": tensor, "mask": tensor}.
Transform = Callable[..., dict[str, Any]]

_INDEX_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


class MaskDataset(TaskDataset):
    """Images with their class-index masks, checked against each other and transformed together.

    Subclasses say where a mask comes from (`load_mask`); this class decodes, checks and transforms.
    """

    def __init__(self, images: list[Path], num_classes: int, ignore_index: int, transform: Transform | None) -> None:
        self.images = images
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform

    @abstractmethod
    def load_mask(self, index: int) -> tuple[np.ndarray, str]:
        """The mask of image `index` as an (H, W) integer array, and what to call its source in errors."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_rgb(self.images[index])
        mask, source = self.load_mask(index)
        if mask.shape != image.shape[:2]:
            raise UserError(f"mask {source} is {mask.shape[1]}x{mask.shape[0]} but image '{self.images[index]}' is "
                            f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
        check_mask_values(mask, source, self.num_classes, self.ignore_index)
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1).float().div(255.0), torch.from_numpy(mask).long()
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class MaskFileDataset(MaskDataset):
    """Masks stored as class-index PNGs beside the images (VOC and folder layouts)."""

    def __init__(self, images: list[Path], masks: list[Path], num_classes: int, ignore_index: int,
                 transform: Transform | None = None) -> None:
        super().__init__(images, num_classes, ignore_index, transform)
        self.masks = masks

    def load_mask(self, index: int) -> tuple[np.ndarray, str]:
        return read_mask(self.masks[index]), f"'{self.masks[index]}'"

    def files(self) -> list[Path]:
        return [*self.images, *self.masks]


class CocoMaskDataset(MaskDataset):
    """Masks rasterised on the fly from COCO annotations (polygons, RLE) of each image."""

    def __init__(self, images: list[Path], sizes: list[tuple[int, int]], annotations: list[list[dict]],
                 labels: dict[int, int], json_path: Path, num_classes: int, ignore_index: int,
                 transform: Transform | None = None) -> None:
        super().__init__(images, num_classes, ignore_index, transform)
        self.sizes = sizes  # (height, width) as the json states them
        self.annotations = annotations
        self.labels = labels  # category id -> label
        self.json_path = json_path

    def load_mask(self, index: int) -> tuple[np.ndarray, str]:
        height, width = self.sizes[index]
        source = f"of '{self.images[index].name}' in '{self.json_path}'"
        return coco_class_mask(self.annotations[index], height, width, self.labels, source), source

    def files(self) -> list[Path]:
        return [*self.images, self.json_path]


# ---------------------------------------------------------------------------------------------------------------------
# Building the splits


def build_datasets(root: Path, fmt: str, *, train_split: str, val_split: str, classes: list[str] | None,
                   ignore_index: int, train_transform: Transform | None, val_transform: Transform | None,
                   ) -> tuple[MaskDataset, MaskDataset, list[str]]:
    """Train and val datasets of layout `fmt` under `root`, and the class names (index 0 first)."""
    root = Path(root)
    if fmt not in FORMATS:
        raise UserError(f"data.format: unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    if classes is not None and fmt != "folder":
        raise UserError(f"data.classes: only the folder format takes a class list; {fmt} has its own class names "
                        f"(remove data.classes)")
    problem = root_problem(root, fmt)
    if problem:
        raise UserError(problem)
    if fmt == "coco":
        # The train split's categories define the labels; the val split must use the same ids.
        train_json, val_json = _coco_json(root, train_split), _coco_json(root, val_split)
        train_data = _read_json(train_json)
        names, labels = _coco_classes(train_data, train_json)
        _check_ignore_index(ignore_index, names)
        return (_coco_dataset(root, train_split, train_json, train_data, labels, ignore_index, train_transform),
                _coco_dataset(root, val_split, val_json, _read_json(val_json), labels, ignore_index, val_transform),
                names)
    names = list(VOC_CLASSES) if fmt == "voc" else _folder_classes(root, classes)
    _check_ignore_index(ignore_index, names)
    pairs = _voc_pairs if fmt == "voc" else _folder_pairs
    splits = [MaskFileDataset(*pairs(root, split), len(names), ignore_index, transform)
              for split, transform in ((train_split, train_transform), (val_split, val_transform))]
    return splits[0], splits[1], names


def root_problem(root: Path, fmt: str) -> str | None:
    if not Path(root).is_dir():
        return f"data.root: folder '{root}' does not exist; {_ROOT_HINT[fmt]}"
    return None


_ROOT_HINT = {
    "voc": "download Pascal VOC 2012 (VOCtrainval_11-May-2012.tar) and extract it into data/, which gives "
           "data/VOCdevkit/VOC2012, or point data.root at your VOC2012 folder",
    "folder": "point data.root at a folder holding images/<split>/ and masks/<split>/",
    "coco": "generate demo data with 'pipeline data synth --kind coco --out data/shapes' or point data.root at a "
            "folder holding annotations/ and the images",
}


def _check_ignore_index(ignore_index: int, classes: list[str]) -> None:
    if ignore_index < len(classes):
        raise UserError(f"data.ignore_index={ignore_index} is a class index ({classes[ignore_index]}) of the "
                        f"{len(classes)} classes; use a value >= {len(classes)} such as 255")


def _voc_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise UserError(f"VOC split file '{list_file}' not found; is data.root the VOC2012 folder (holding "
                        f"JPEGImages/, SegmentationClass/, ImageSets/)? check data.root and data.*_split")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not stems:
        raise UserError(f"VOC split file '{list_file}' lists no images; it needs one image name per line")
    images = [root / "JPEGImages" / f"{stem}.jpg" for stem in stems]
    masks = [root / "SegmentationClass" / f"{stem}.png" for stem in stems]
    _first_missing(images, f"image listed in '{list_file}'")
    _check_masks(images, masks)
    return images, masks


def _folder_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    image_dir, mask_dir = root / "images" / split, root / "masks" / split
    if not image_dir.is_dir():
        raise UserError(f"data.root: '{image_dir}' not found; the folder format needs images/<split>/ and "
                        f"masks/<split>/ under data.root (splits: data.train_split, data.val_split)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not p.name.startswith("."))
    if not images:
        raise UserError(f"data.root: '{image_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    masks = [mask_dir / f"{p.stem}.png" for p in images]
    _check_masks(images, masks)
    return images, masks


def _folder_classes(root: Path, classes: list[str] | None) -> list[str]:
    if classes is None:
        listing = root / "classes.txt"
        if not listing.is_file():
            raise UserError(f"data.classes: no class list; set data.classes (names by mask index, background "
                            f"first) or write '{listing}' with one name per line")
        classes = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if len(classes) < 2:
        raise UserError(f"data.classes: {classes} has fewer than two classes; list every class by its mask index "
                        f"(background first)")
    return list(classes)


def _check_masks(images: list[Path], masks: list[Path]) -> None:
    for image, mask in zip(images, masks):
        if not mask.is_file():
            raise UserError(f"image '{image}' has no mask: '{mask}' is missing; add it or remove the image")


def _first_missing(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{what} is missing: '{missing[0]}'{more}")


# ---------------------------------------------------------------------------------------------------------------------
# Masks


def read_mask(path: Path) -> np.ndarray:
    """A class-index PNG (palette as in VOC, or grayscale) as an (H, W) integer array of the stored indices."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            values = np.array(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"mask '{path}' is corrupt or not an image ({str(err).splitlines()[0]}); replace it") from err
    if mode not in _INDEX_MODES:
        raise UserError(f"mask '{path}' is a {mode} colour image; masks must hold one class index per pixel "
                        f"(palette or grayscale PNG, like VOC's SegmentationClass)")
    # Palette images give their indices, not colours, which is what VOC's palette PNGs store.
    return values.astype(np.uint8) if mode in ("P", "L", "1") else values.astype(np.int32)


def check_mask_values(mask: np.ndarray, source: str, num_classes: int, ignore_index: int) -> None:
    if mask.size == 0 or int(mask.max()) < num_classes:
        return
    bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_index)])
    if bad.size:
        raise UserError(f"mask {source} has class index {int(bad[0])} (values out of range: "
                        f"{', '.join(str(int(v)) for v in bad[:5])}) but there are {num_classes} classes "
                        f"(0..{num_classes - 1}) and data.ignore_index is {ignore_index}; fix the mask or the classes")


def coco_class_mask(annotations: list[dict], height: int, width: int, labels: dict[int, int],
                    source: str) -> np.ndarray:
    """One image's annotations painted into an (H, W) label mask: larger instances first, smaller on top."""
    shapes = []
    for ann in annotations:
        rle = _rle(ann.get("segmentation"), height, width, source, ann.get("id"))
        if rle is not None:
            shapes.append((-float(mask_utils.area(rle)), ann.get("id", 0), labels[ann["category_id"]], rle))
    mask = np.zeros((height, width), dtype=np.uint8 if len(labels) < 255 else np.int32)
    for _, _, label, rle in sorted(shapes, key=lambda s: s[:2]):
        mask[mask_utils.decode(rle) > 0] = label
    return mask


def _rle(segmentation: Any, height: int, width: int, source: str, ann_id: Any) -> dict | None:
    if isinstance(segmentation, list):
        # A polygon needs three points; COCO has a few degenerate ones, which cover no pixels.
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)) if polygons else None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise UserError(f"annotation {ann_id} {source}: RLE size {segmentation['size']} differs from the image's "
                            f"[{height}, {width}]")
        if isinstance(segmentation["counts"], list):  # uncompressed RLE (iscrowd regions)
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    raise UserError(f"annotation {ann_id} {source}: 'segmentation' is neither a list of polygons nor an RLE dict; "
                    f"fix the annotation file")


def _coco_classes(data: dict, json_path: Path) -> tuple[list[str], dict[int, int]]:
    """Class names (background first) and the category id -> label map: ids in increasing order get 1..K."""
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if not categories:
        raise UserError(f"COCO file '{json_path}' has no categories; it needs at least one")
    labels = {c["id"]: i for i, c in enumerate(categories, start=1)}
    return ["background"] + [str(c["name"]) for c in categories], labels


def _coco_dataset(root: Path, split: str, json_path: Path, data: dict, labels: dict[int, int], ignore_index: int,
                  transform: Transform | None) -> CocoMaskDataset:
    image_dir = root / "images" / split if (root / "images" / split).is_dir() else root / split
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        if ann.get("category_id") not in labels:
            raise UserError(f"annotation {ann.get('id')} in '{json_path}' has category_id {ann.get('category_id')}, "
                            f"which is not among the train categories {sorted(labels)}")
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    entries = sorted(data["images"], key=lambda e: e["id"])
    if not entries:
        raise UserError(f"COCO file '{json_path}' lists no images")
    images = [inside(image_dir, e["file_name"]) for e in entries]
    for entry, image in zip(entries, images):
        if image is None:
            raise UserError(f"COCO file '{json_path}' image {entry['id']} has file_name '{entry['file_name']}', which "
                            f"points outside the image folder '{image_dir}'; file names must be relative to it")
    _first_missing(images, f"image listed in '{json_path}'")
    return CocoMaskDataset(images, [(int(e["height"]), int(e["width"])) for e in entries],
                           [by_image.get(e["id"], []) for e in entries], labels, json_path, len(labels) + 1,
                           ignore_index, transform)


def _coco_json(root: Path, split: str) -> Path:
    candidates = [root / "annotations" / f"{split}.json", root / "annotations" / f"instances_{split}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"COCO annotations for split '{split}' not found: neither '{candidates[0]}' nor "
                    f"'{candidates[1]}' exists; check data.root and data.*_split")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"COCO file '{path}' is not readable json ({' '.join(str(err).split())[:120]})") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise UserError(f"COCO file '{path}' lacks the 'images' and 'categories' lists of the COCO instances format")
    for key, needed in (("images", ("id", "file_name", "height", "width")), ("categories", ("id", "name"))):
        for entry in data[key]:
            lacking = [k for k in needed if k not in entry] if isinstance(entry, dict) else list(needed)
            if lacking:
                raise UserError(f"COCO file '{path}': an entry of '{key}' lacks {', '.join(lacking)} "
                                f"(each needs {', '.join(needed)})")
    data.setdefault("annotations", [])
    return data
