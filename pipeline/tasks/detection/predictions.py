"""Detection on new images (`pipeline predict`, serving): boxes back in the original pixels, per-image records, and the
writer of a COCO results file plus each image with its boxes drawn."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline.data.images import read_rgb
from pipeline.tasks.base import DataInfo, Placement, PredictOptions
from pipeline.tasks.common import OutputNames

# Box colours by label, cycled: distinct on photos and on the synthetic scenes' flat backgrounds.
COLORS = ((255, 140, 0), (30, 144, 255), (50, 205, 50), (220, 20, 60), (186, 85, 211), (255, 215, 0),
          (0, 206, 209), (255, 105, 180))
JPEG_SUFFIXES = (".jpg", ".jpeg")


def to_original(outputs: torch.Tensor, placements: list[Placement]) -> torch.Tensor:
    """(N, rows, 6) detections with boxes moved from the model input's pixels to each original image's: shifted by
    the padding, scaled by the resize, clipped to the image. Unused rows (category -1) stay zero."""
    out = outputs.clone().float()
    for rows, place in zip(out, placements):
        sx, sy = place.scale
        x0, y0 = place.box[:2]
        rows[:, 0:4:2] = ((rows[:, 0:4:2] - x0) * sx).clamp(0, place.width)
        rows[:, 1:4:2] = ((rows[:, 1:4:2] - y0) * sy).clamp(0, place.height)
        rows[rows[:, 5] < 0, :5] = 0
    return out


def records(outputs: torch.Tensor, info: DataInfo, options: PredictOptions) -> list[dict]:
    """{"detections": [{"bbox": [x1, y1, x2, y2], "score", "category_id", "category"}, ...]} per image, best first,
    scoring at least `options.score`; ids and names are the annotation file's."""
    names = dict(zip(info.facts.category_ids, info.classes))
    out = []
    for rows in outputs.float().tolist():
        detections = [{"bbox": [round(v, 2) for v in (x1, y1, x2, y2)], "score": round(score, 5),
                       "category_id": int(cid), "category": names.get(int(cid), str(int(cid)))}
                      for x1, y1, x2, y2, score, cid in rows if cid >= 0 and score >= options.score]
        out.append({"detections": sorted(detections, key=lambda d: -d["score"])})
    return out


class CocoResults:
    """`predictions.json`: every detection the model returns as a COCO results list (image_id = the image's place in
    the input order, bbox x, y, width, height in original pixels, the file's category id and name, plus file_name),
    which `COCO.loadRes` reads; and `boxes/<image>`: each image with its detections at or above `--score` drawn."""

    def __init__(self, out_dir: Path, info: DataInfo, options: PredictOptions,
                 records: Callable[[torch.Tensor, DataInfo, PredictOptions], list[dict]]) -> None:
        self.path = out_dir / "predictions.json"
        self.boxes = out_dir / "boxes"
        self.boxes.mkdir(parents=True, exist_ok=True)
        self.info = info
        self.score = options.score
        self.every = dataclasses.replace(options, score=0.0)  # the results file keeps what the model returns
        self.records = records
        self.names = OutputNames()
        self.results: list[dict] = []
        self.images = 0

    def add(self, paths: list[Path], outputs: torch.Tensor) -> None:
        for path, record in zip(paths, self.records(outputs, self.info, self.every)):
            for d in record["detections"]:
                x1, y1, x2, y2 = d["bbox"]
                self.results.append({"image_id": self.images, "file_name": str(path), "category_id": d["category_id"],
                                     "category": d["category"], "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                                     "score": d["score"]})
            self.images += 1
            shown = [d for d in record["detections"] if d["score"] >= self.score]
            suffix = ".jpg" if path.suffix.lower() in JPEG_SUFFIXES else ".png"
            draw_boxes(path, shown, self.info.facts.category_ids, self.boxes / self.names(path, suffix))

    def finish(self) -> list[Path]:
        self.path.write_text(json.dumps(self.results))
        return [self.path, self.boxes]


def draw_boxes(image_path: Path, detections: list[dict], category_ids: list[int], out: Path) -> Path:
    """The image with each detection's box and "name score" label, in the colour of its category."""
    image = Image.fromarray(read_rgb(image_path))
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 200))  # visible on large photos, not swamping small ones
    for d in detections:
        index = category_ids.index(d["category_id"]) if d["category_id"] in category_ids else 0
        color = COLORS[index % len(COLORS)]
        x1, y1, x2, y2 = d["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        label = f"{d['category']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label)
        # above the box's top-left corner, moved inside the image where it would leave it
        x = max(0.0, min(x1, image.width - (right - left) - 2))
        y = max(0.0, y1 - (bottom - top) - 2)
        draw.rectangle((x, y, x + right + 2, y + bottom + 1), fill=color)
        draw.text((x + 1, y), label, fill=(0, 0, 0))
    image.save(out, **({"quality": 92} if out.suffix == ".jpg" else {}))
    return out
