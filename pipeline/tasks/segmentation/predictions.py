"""Segmentation on new images (`pipeline predict`, serving): logits back at each original image's size, per-image
records (a palette PNG of class indices), and the writer of masks, overlays and the class list."""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import read_rgb
from pipeline.tasks.base import DataInfo, Placement, PredictOptions
from pipeline.tasks.common import OutputNames
from pipeline.tasks.segmentation.model import upsample
from pipeline.tasks.segmentation.report import overlay, palette

PALETTE_MAX = 256  # classes a palette ('P') PNG can index; more are written as 16-bit grey values


def to_original(logits: torch.Tensor, placements: list[Placement]) -> list[torch.Tensor]:
    """One (C, H, W) logits tensor per image at its original size: the padding the transforms added is cut away and
    the rest resized (bilinear, as at evaluation) to the original height and width."""
    out = []
    for row, place in zip(logits, placements):
        x1, y1, x2, y2 = (round(v) for v in place.box)
        out.append(upsample(row[None, :, y1:y2, x1:x2], (place.height, place.width))[0])
    return out


def mask_png(mask: np.ndarray, num_classes: int) -> bytes:
    """A PNG of class indices coloured with the report's palette (pipeline/tasks/segmentation/report.py), so a viewer
    shows the classes and a reader gets the indices back with `np.asarray(Image.open(...))`."""
    buffer = io.BytesIO()
    if num_classes <= PALETTE_MAX:
        image = Image.fromarray(mask.astype(np.uint8))
        image.putpalette(palette_bytes(num_classes))  # makes the grey ('L') image a palette ('P') one
    else:
        image = Image.fromarray(mask.astype(np.uint16))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def palette_bytes(num_classes: int) -> list[int]:
    return (palette(num_classes) * 255).round().astype(np.uint8).ravel().tolist()


def records(outputs: list[torch.Tensor], info: DataInfo, options: PredictOptions) -> list[dict]:
    """{"mask_png": base64 PNG of class indices in the dataset's palette, "height", "width", "classes": [names
    present]} per image, from its (C, H, W) logits at the original size."""
    out = []
    for logits in outputs:
        mask = logits.argmax(dim=0).numpy()
        present = np.unique(mask)
        out.append({"mask_png": base64.b64encode(mask_png(mask, info.num_classes)).decode("ascii"),
                    "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                    "classes": [info.classes[i] for i in present.tolist()]})
    return out


def decode_mask(png: bytes) -> np.ndarray:
    """The class indices of a mask PNG written by `mask_png`."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image).astype(np.int64)


class Masks:
    """`masks/<image>.png`: class indices in the palette of the report, at the image's size; `overlays/<image>.png`:
    the image with each class tinted by its colour; `classes.json`: index, name and colour of every class."""

    def __init__(self, out_dir: Path, info: DataInfo, options: PredictOptions,
                 records: Callable[[list[torch.Tensor], DataInfo, PredictOptions], list[dict]]) -> None:
        self.out_dir = out_dir
        self.masks, self.overlays = out_dir / "masks", out_dir / "overlays"
        for folder in (self.masks, self.overlays):
            folder.mkdir(parents=True, exist_ok=True)
        self.info, self.options, self.records = info, options, records
        self.colors = palette(info.num_classes)
        self.names = OutputNames()

    def add(self, paths: list[Path], outputs: list[torch.Tensor]) -> None:
        for path, record in zip(paths, self.records(outputs, self.info, self.options)):
            png = base64.b64decode(record["mask_png"])
            name = self.names(path, ".png")
            (self.masks / name).write_bytes(png)
            image = read_rgb(path).astype(np.float64) / 255.0
            ignore = self.info.facts.ignore_index
            tinted = overlay(image, decode_mask(png), self.colors, ignore)
            Image.fromarray((tinted * 255).round().astype(np.uint8)).save(self.overlays / name)

    def finish(self) -> list[Path]:
        path = self.out_dir / "classes.json"
        classes = [{"index": i, "name": name, "color": [round(c * 255) for c in self.colors[i]]}
                   for i, name in enumerate(self.info.classes)]
        path.write_text("[\n" + ",\n".join(json.dumps(c) for c in classes) + "\n]\n")  # one class per line
        return [self.masks, self.overlays, path]
