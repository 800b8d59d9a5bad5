"""COCO-format detection data: annotation files checked into per-image box arrays, and the dataset that serves them.

Category ids may be any integers (COCO's 1..90 with gaps); they map to contiguous labels 1..K in sorted id order
(0 is torchvision's background) and back for evaluation and predictions. Crowd annotations never become training
targets but stay in the ground truth that COCOeval ignores matches against. Boxes are clipped to the image; boxes with
no area left (zero or negative size, or wholly outside the image) are dropped and counted.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from pipeline.data.dataset import TaskDataset
from pipeline.data.images import inside, read_rgb
from pipeline.errors import UserError
from pipeline.tasks.classification.data import find_bad_images

log = logging.getLogger(__name__)

# How many offending names an error lists before "...".
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class ImageRecord:
    """One image and its usable annotations, boxes as (x1, y1, x2, y2) pixels clipped to the image."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray   # (N, 4) float32
    labels: np.ndarray  # (N,) int64, contiguous 1..K
    crowd: np.ndarray   # (N,) bool
    area: np.ndarray    # (N,) float32, the annotation's `area` (mask area in COCO), else the box area


@dataclass(frozen=True)
class CocoSplit:
    """An annotation file read and checked: its categories (sorted by id) and its images."""

    category_ids: list[int]
    classes: list[str]
    images: list[ImageRecord]
    dropped_boxes: int


def read_coco(ann_file: Path, image_root: Path, field: str) -> CocoSplit:
    """Read and check a COCO instances file; `field` (e.g. data.train_ann) names it in every error message."""
    data = _load_json(ann_file, field)
    category_ids, classes = _categories(data["categories"], ann_file, field)
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    images = _images(data["images"], ann_file, image_root, field)
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        where = f"{field}: '{ann_file}' annotation {ann.get('id', f'#{i}') if isinstance(ann, dict) else f'#{i}'}"
        if not isinstance(ann, dict):
            raise UserError(f"{where} is not an object; each annotation needs image_id, category_id and bbox")
        if ann.get("image_id") not in per_image:
            raise UserError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise UserError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
                            f"(ids {_few(category_ids)}); add the category or fix the annotation")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise UserError(f"{where} has bbox {bbox!r}; a bbox is four numbers [x, y, width, height]")
        per_image[ann["image_id"]].append(ann)
    records, dropped = [], 0
    for image_id, (path, width, height) in images.items():
        record, n_dropped = _record(image_id, path, width, height, per_image[image_id], label_of)
        records.append(record)
        dropped += n_dropped
    if dropped:
        log.warning("%s: dropped %d degenerate box(es) of '%s' (zero or negative size, or outside the image)",
                    field, dropped, ann_file)
    return CocoSplit(category_ids, classes, records, dropped)


def annotation_problem(path: Path, field: str) -> str | None:
    if not path.is_file():
        return (f"{field}: annotation file '{path}' not found; check data.root and {field} "
                f"(COCO: data/coco/annotations/instances_train2017.json from cocodataset.org)")
    return None


def _load_json(path: Path, field: str) -> dict:
    problem = annotation_problem(path, field)
    if problem:
        raise UserError(problem)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{field}: '{path}' is not valid JSON ({err.msg} at line {err.lineno}); "
                        "re-export or re-download it") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{field}: cannot read '{path}' ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise UserError(f"{field}: '{path}' is not a COCO instances file: it needs the lists 'images', "
                        "'annotations' and 'categories'")
    return data


def _categories(categories: list, path: Path, field: str) -> tuple[list[int], list[str]]:
    names: dict[int, str] = {}
    for cat in categories:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise UserError(f"{field}: '{path}' has category {cat!r}; each needs an integer id and a name")
        if cat["id"] in names:
            raise UserError(f"{field}: '{path}' lists category id {cat['id']} twice")
        names[cat["id"]] = cat["name"]
    if not names:
        raise UserError(f"{field}: '{path}' has no categories")
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def _images(images: list, path: Path, root: Path, field: str) -> dict[int, tuple[Path, int, int]]:
    """image id -> (file, width, height); every file checked to exist inside `root`."""
    out: dict[int, tuple[Path, int, int]] = {}
    missing: list[str] = []
    for entry in images:
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)
                and isinstance(entry.get("file_name"), str)):
            raise UserError(f"{field}: '{path}' has image entry {str(entry)[:120]}; each needs an integer id and a "
                            "file_name")
        file = inside(root, entry["file_name"])
        if file is None:
            raise UserError(f"{field}: '{path}' image {entry['id']} has file_name '{entry['file_name']}', which "
                            f"points outside the image folder '{root}'; file names must be relative to it")
        if entry["id"] in out:
            raise UserError(f"{field}: '{path}' lists image id {entry['id']} twice")
        if not file.is_file():
            missing.append(str(file))
            continue
        width, height = entry.get("width"), entry.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            try:
                with Image.open(file) as img:  # reads the header only
                    width, height = img.size
            except OSError as err:
                raise UserError(f"{field}: '{path}' gives no width/height for image {entry['id']} and '{file}' is not "
                                f"a readable image ({err}); fix the file or add its width and height") from None
        out[entry["id"]] = (file, width, height)
    if missing:
        more = ", ..." if len(missing) > _NAMES_SHOWN else ""
        raise UserError(f"{field}: {len(missing)} image(s) listed in '{path}' are missing: "
                        f"{', '.join(missing[:_NAMES_SHOWN])}{more}; check the image folder (data.train_images / "
                        "data.val_images)")
    return out


def _record(image_id: int, path: Path, width: int, height: int, anns: list[dict],
            label_of: dict[int, int]) -> tuple[ImageRecord, int]:
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    clipped = boxes.clip(0, [width, height, width, height])
    # A box with no width or height (given, or left after clipping to the image) cannot be learned or matched.
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    kept = [a for a, k in zip(anns, keep) if k]
    clipped = clipped[keep]
    area = np.array([a["area"] if _is_number(a.get("area")) else (b[2] - b[0]) * (b[3] - b[1])
                     for a, b in zip(kept, clipped)], dtype=np.float32)
    record = ImageRecord(
        image_id=image_id, path=path, width=width, height=height, boxes=clipped.astype(np.float32),
        labels=np.array([label_of[a["category_id"]] for a in kept], dtype=np.int64),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in kept], dtype=bool), area=area)
    return record, int((~keep).sum())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _few(values: list) -> str:
    return ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Dataset


class CocoDetection(TaskDataset):
    """(image CHW float tensor, target dict) per image, through an albumentations pipeline with bbox support.

    The target holds what torchvision's detector trains on (`boxes` xyxy in the transformed image, `labels`) and what
    COCO evaluation needs in the original image: `image_id`, `scale` (original / transformed width and height, to
    map predictions back), `orig_size` (height, width) and the ground truth `coco_boxes` (xywh), `coco_labels`,
    `coco_crowd`, `coco_area`, crowd annotations included.
    """

    def __init__(self, records: list[ImageRecord], transform: Callable[..., dict] | None,
                 group_aspect_ratio: bool = False, ann_file: Path | None = None) -> None:
        self.records = records
        self.transform = transform
        self.group_aspect_ratio = group_aspect_ratio
        self.ann_file = ann_file  # the annotation file the records were read from

    def files(self) -> list[Path]:
        return [rec.path for rec in self.records] + ([self.ann_file] if self.ann_file is not None else [])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self.records[index]
        image = read_rgb(rec.path)
        if image.shape[:2] != (rec.height, rec.width):
            raise UserError(f"image '{rec.path}' is {image.shape[1]}x{image.shape[0]} pixels but its annotation "
                            f"file says {rec.width}x{rec.height}; fix the width and height of image {rec.image_id}")
        train = ~rec.crowd
        boxes, labels = rec.boxes[train], rec.labels[train]
        if self.transform is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
        elif "bboxes" not in self.transform.processors:  # no geometric transform: boxes stay as they are
            tensor = self.transform(image=image)["image"]
        else:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            tensor = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        h, w = tensor.shape[-2:]
        xywh = np.concatenate([rec.boxes[:, :2], rec.boxes[:, 2:] - rec.boxes[:, :2]], axis=1)
        target = {
            "boxes": torch.from_numpy(boxes).float().reshape(-1, 4),  # (0, 4) for an image without boxes
            "labels": torch.from_numpy(labels).long(),
            "image_id": torch.tensor(rec.image_id),
            "scale": torch.tensor([rec.width / w, rec.height / h], dtype=torch.float32),
            "orig_size": torch.tensor([rec.height, rec.width]),
            "coco_boxes": torch.from_numpy(xywh),
            "coco_labels": torch.from_numpy(rec.labels),
            "coco_crowd": torch.from_numpy(rec.crowd),
            "coco_area": torch.from_numpy(rec.area),
        }
        return tensor, target

    @staticmethod
    def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
        """Images of different sizes do not stack: a batch is a list of images and a list of targets."""
        images, targets = zip(*batch)
        return list(images), list(targets)

    def group_batches(self, sampler: Sampler, batch_size: int) -> Sampler:
        """The training order, with `group_aspect_ratio` reordered so each batch holds landscape (or square) images
        only, or portrait ones only (the loader calls this with its shuffling sampler)."""
        if not self.group_aspect_ratio:
            return sampler
        return GroupedSampler(sampler, [int(rec.height > rec.width) for rec in self.records], batch_size)


def select_images(records: list[ImageRecord], keep_empty: bool, field: str) -> list[ImageRecord]:
    """Training images: those without a (non-crowd) box are negatives with `keep_empty`, else left out."""
    if keep_empty:
        return records
    kept = [rec for rec in records if (~rec.crowd).any()]
    if len(kept) < len(records):
        log.info("%s: left out %d image(s) without boxes (data.keep_empty: false)", field, len(records) - len(kept))
    if not kept:
        raise UserError(f"{field}: no image has a usable box; check the annotations or set data.keep_empty: true")
    return kept


def drop_unreadable(records: list[ImageRecord], field: str) -> list[ImageRecord]:
    """`records` without the images that do not decode (data.skip_bad_images); logs how many and the first few."""
    bad = set(find_bad_images([rec.path for rec in records]))
    if bad:
        names = ", ".join(str(path) for path in sorted(bad)[:_NAMES_SHOWN])
        more = ", ..." if len(bad) > _NAMES_SHOWN else ""
        log.warning("%s: skipped %d unreadable image(s) (data.skip_bad_images): %s%s", field, len(bad), names, more)
    return [rec for rec in records if rec.path not in bad]


class GroupedSampler(Sampler):
    """The items of a shuffling sampler reordered so that every run of `batch_size` items shares an aspect group
    (landscape / portrait): padding a batch to its largest image then wastes little. Items keep the shuffled order
    within a group; the groups' leftovers come last, so only the final batches mix groups."""

    def __init__(self, sampler: Sampler, groups: list[int], batch_size: int) -> None:
        self.sampler, self.groups, self.batch_size = sampler, groups, batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        buffers: dict[int, list] = {}
        for item in self.sampler:
            index = item[0] if isinstance(item, tuple) else item  # EpochSampler yields (index, seed)
            buffer = buffers.setdefault(self.groups[index], [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield from buffer
                buffer.clear()
        for buffer in buffers.values():
            yield from buffer
