"""Synthetic shapes scenes in COCO format, for detection and segmentation.

Each image holds 0-3 non-overlapping shapes of the six classes of `synth.SHAPES` on a textured background. Written
under `out/coco/`:

    images/{train,val}/NNNN.png        RGB
    annotations/{train,val}.json       COCO instances: boxes, polygons, area, iscrowd 0
    masks/{train,val}/NNNN.png         uint8 class index per pixel (0 background, 1..6 in SHAPES order)
    classes.txt                        background and the six class names, one per line

Category ids are deliberately not contiguous (like COCO's 1..90 for 80 classes), so the id mapping of every
consumer is exercised. Masks are rasterised from the annotation polygons with pycocotools, so mask and polygon
labels agree pixel for pixel. Every image has its own generator seeded from (seed, split, index).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data import synth
from pipeline.errors import UserError

CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 4, "star": 5, "hexagon": 8, "cross": 9}
SIZE_RANGE = (0.15, 0.5)  # shape diameter as a fraction of the image side: COCO small, medium and large boxes
MAX_SHAPES = 3
EMPTY_FRACTION = 0.05  # images with no shape: negatives for detection
_PLACEMENT_TRIES = 50


def generate(out: Path, seed: int = 0, overwrite: bool = False, image_size: int = 128, train_images: int = 400,
             val_images: int = 100) -> Path:
    """Write the scenes under `out/coco` and return that folder."""
    out = Path(out)
    if seed < 0 or image_size < 32 or train_images < 1 or val_images < 1:
        raise UserError(f"synthetic COCO data needs seed >= 0, image_size >= 32 and at least one image per split; "
                        f"got seed={seed}, image_size={image_size}, train_images={train_images}, "
                        f"val_images={val_images}")
    with synth.written(out, "coco", overwrite) as scratch:
        (scratch / "annotations").mkdir()
        for split_index, (split, count) in enumerate((("train", train_images), ("val", val_images))):
            _write_split(scratch, split, split_index, count, seed, image_size)
        (scratch / "classes.txt").write_text("\n".join(("background",) + synth.SHAPES) + "\n")
    return out / "coco"


def _write_split(scratch: Path, split: str, split_index: int, count: int, seed: int, image_size: int) -> None:
    """One split's images, class masks and annotation file."""
    (scratch / "images" / split).mkdir(parents=True)
    (scratch / "masks" / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, 100 + split_index, index])
        image, shapes = render_scene(rng, image_size)
        name = f"{index:04d}.png"
        Image.fromarray(image).save(scratch / "images" / split / name, format="PNG")
        images.append({"id": index + 1, "file_name": name, "width": image_size, "height": image_size})
        mask = np.zeros((image_size, image_size), dtype=np.uint8)
        for drawn in shapes:
            ann = _annotation(len(annotations) + 1, index + 1, drawn, image_size)
            annotations.append(ann)
            label = synth.SHAPES.index(drawn.kind) + 1
            mask[_rasterise(ann["segmentation"], image_size) > 0] = label
        Image.fromarray(mask, mode="L").save(scratch / "masks" / split / name, format="PNG")
    coco = {"info": {"description": f"synthetic shapes scenes, seed {seed}"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": CATEGORY_IDS[k], "name": k, "supercategory": "shape"} for k in synth.SHAPES]}
    (scratch / "annotations" / f"{split}.json").write_text(json.dumps(coco))


def render_scene(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[synth.DrawnShape]]:
    """A background with 0..MAX_SHAPES shapes whose circumscribed circles do not overlap."""
    _, background_colors = synth.random_colors(rng)
    image = synth.random_background(rng, image_size, background_colors)
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_SHAPES + 1))
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for _ in range(count):
        for _ in range(_PLACEMENT_TRIES):
            radius = rng.uniform(*SIZE_RANGE) * image_size / 2
            cx, cy = rng.uniform(radius, image_size - radius, size=2)
            if all(math.hypot(cx - x, cy - y) > radius + r + 1 for x, y, r in placed):
                break
        else:
            continue  # no room left in this image
        placed.append((cx, cy, radius))
        kind = synth.SHAPES[rng.integers(len(synth.SHAPES))]
        # Each shape gets its own colour, always lighter than the background (see synth.random_colors).
        color = _lighter_color(rng, background_colors)
        image, drawn = synth.draw_shape(image, kind, (cx, cy), radius, rng.uniform(0, 2 * math.pi), color)
        shapes.append(drawn)
    return image, shapes


def _lighter_color(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    floor = float((background @ synth.LUMA).max()) + synth.MIN_CONTRAST
    for _ in range(_PLACEMENT_TRIES):
        color = rng.integers(0, 256, size=3)
        if color @ synth.LUMA >= floor:
            return int(color[0]), int(color[1]), int(color[2])
    return 255, 255, 255


def _annotation(ann_id: int, image_id: int, drawn: synth.DrawnShape, image_size: int) -> dict:
    polygon = [round(c, 2) for xy in drawn.polygon for c in xy]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], image_size, image_size))
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[drawn.kind],
            "bbox": [round(v, 2) for v in drawn.bbox], "area": float(mask_utils.area(rle)),
            "segmentation": [polygon], "iscrowd": 0}


def _rasterise(segmentation: list[list[float]], image_size: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, image_size, image_size)))
