"""The segmentation task: the contract of pipeline/tasks/base.py for DeepLabV3 on a dilated backbone."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import synth_coco
from pipeline.data.transform_checks import RESIZES
from pipeline.errors import UserError
from pipeline.tasks import export_checks
from pipeline.tasks.base import DataInfo, ExportSpec, Facts, Placement, PredictOptions, Task, TaskData
from pipeline.tasks.common import save_figure
from pipeline.tasks.segmentation import metrics as seg_metrics
from pipeline.tasks.segmentation import model as M
from pipeline.tasks.segmentation import predictions
from pipeline.tasks.segmentation.config import SegmentationData, SegmentationModel
from pipeline.tasks.segmentation.data import VOC_CLASSES, build_datasets, root_problem
from pipeline.tasks.segmentation.report import iou_bars, overlay_grid, per_class_table


@dataclass
class SegmentationFacts(Facts):
    ignore_index: int = 255  # the mask value that counts nowhere (data.ignore_index)


def _cross_entropy(model: M.DeepLabV3, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels, in float32; 0 (not NaN) for a crop that is all ignore."""
    logits = M.upsample(logits, masks.shape[-2:])
    weight = model.class_weights
    total = F.cross_entropy(logits, masks, weight=weight, ignore_index=model.ignore_index, reduction="sum")
    # The denominator of reduction="mean", computed without boolean indexing (no host sync on a GPU).
    valid = masks != model.ignore_index
    count = valid.sum() if weight is None else (weight[masks.masked_fill(~valid, 0)] * valid).sum()
    return total / count.to(total.dtype).clamp(min=1e-12)


class Segmentation(Task):
    name = "segmentation"
    synth = "coco"  # the synthetic shapes scenes (COCO json + class masks)
    facts = SegmentationFacts
    # checked by the class each pixel gets: near-tied logits may swap through rounding alone
    export = ExportSpec(output_names=("logits",), dynamic_size=True, check=export_checks.argmax)
    # Masks go through the same transforms and are scored as they come out: a resize rescales both, and padding counts
    # nowhere where masks are padded with ignore_index (val_transform_problem; tests/test_transform_checks.py proves
    # it). A crop or rotation would score other pixels than the image's, and inference (to_original) undoes no flip.
    val_geometry = RESIZES | {"PadIfNeeded"}
    mirror_outputs = staticmethod(lambda logits: logits.flip(-1))  # a mirrored image's mask, mirrored back

    def default_transforms(self, data: SegmentationData) -> tuple[list[dict], list[dict]]:
        """Train: scale to image_size, random rescale 0.5-2x, pad (mask: ignore) and crop, flip. Val: scale and pad.

        Padding keeps the aspect ratio and lets validation batches stack; padded pixels are ignored by loss and
        metrics.
        """
        size = data.image_size
        pad = {"name": "PadIfNeeded", "min_height": size, "min_width": size, "border_mode": 0, "fill": 0,
               "fill_mask": data.ignore_index}
        train = [{"name": "LongestMaxSize", "max_size": size},
                 {"name": "RandomScale", "scale_limit": [-0.5, 1.0], "p": 1.0},
                 pad,
                 {"name": "RandomCrop", "height": size, "width": size},
                 {"name": "HorizontalFlip", "p": 0.5}]
        val = [{"name": "LongestMaxSize", "max_size": size}, pad]
        return train, val

    def val_transform_problem(self, entry: dict, data: SegmentationData) -> str | None:
        problem = super().val_transform_problem(entry, data)
        if problem is None and entry["name"] == "PadIfNeeded":
            defaults = inspect.signature(A.PadIfNeeded.__init__).parameters
            border = entry.get("border_mode", defaults["border_mode"].default)
            fill_mask = entry.get("fill_mask", defaults["fill_mask"].default)
            if border != cv2.BORDER_CONSTANT or fill_mask != data.ignore_index:
                filled = fill_mask if border == cv2.BORDER_CONSTANT else "mirrored labels"
                return (f"PadIfNeeded pads masks with {filled}, which scores the padding as labelled pixels; give it "
                        "border_mode: 0 and fill_mask: ${data.ignore_index} so that padding counts nowhere")
        return problem

    def missing_data(self, data: SegmentationData) -> str | None:
        return root_problem(Path(data.root), data.format)

    def build_data(self, data: SegmentationData, *, mean, std, seed: int) -> TaskData:
        if data.skip_bad_images:
            raise UserError("data.skip_bad_images: the segmentation task does not skip files; remove the unreadable "
                            "images (and their masks) and set it to false")
        train_tf, val_tf, random = self.transforms(data, mean=mean, std=std, seed=seed)
        train, val, classes = build_datasets(
            Path(data.root), data.format, train_split=data.train_split, val_split=data.val_split,
            classes=data.classes, ignore_index=data.ignore_index, train_transform=train_tf, val_transform=val_tf)
        info = DataInfo(classes=list(classes), train_size=len(train), val_size=len(val), mean=tuple(mean),
                        std=tuple(std), image_size=data.image_size, random_train_transforms=random,
                        facts=SegmentationFacts(data.ignore_index))
        return TaskData(train, val, info)

    def build_model(self, model: SegmentationModel, info: DataInfo) -> M.DeepLabV3:
        b = model.backbone
        voc = [c.lower() for c in info.classes[1:]] == list(VOC_CLASSES[1:])
        return M.build(b.name, b.weights, b.fallback_to_random, num_classes=info.num_classes,
                       output_stride=model.output_stride, atrous_rates=model.atrous_rates, aux=model.aux_loss,
                       aux_weight=model.aux_weight, ignore_index=info.facts.ignore_index,
                       class_weights=model.class_weights, init=model.init, keep_classifier=voc)

    def loss(self, model: M.DeepLabV3, batch) -> dict[str, torch.Tensor]:
        images, masks = batch
        out = model(images)
        losses = {"seg": _cross_entropy(model, out["out"], masks)}
        if "aux" in out:
            losses["aux"] = model.aux_weight * _cross_entropy(model, out["aux"], masks)
        return losses

    def predict(self, model: M.DeepLabV3, batch) -> torch.Tensor:
        """Logits at the masks' resolution, so that scores are computed on the labels as given."""
        images, masks = batch
        return M.upsample(model(images)["out"], masks.shape[-2:])

    def make_evaluator(self, info: DataInfo) -> seg_metrics.Evaluator:
        return seg_metrics.Evaluator(info.classes, info.facts.ignore_index)

    def tiny(self, folder: Path) -> dict[str, dict]:
        root = synth_coco.generate(folder, image_size=64, train_images=4, val_images=2)
        return {"data": {"root": str(root), "format": "coco", "image_size": 64, "batch_size": 2, "num_workers": 0},
                "model": {"backbone": {"name": "resnet18", "weights": "none"}}}

    def report(self, metrics: dict, info: DataInfo, out_dir: Path) -> list[Path]:
        """The overlay grid of validation images, the per-class IoU bar chart and the per-class table."""
        out_dir.mkdir(parents=True, exist_ok=True)
        grid = overlay_grid(metrics["samples"], info.classes, info.mean, info.std, info.facts.ignore_index)
        return [save_figure(grid, out_dir / "overlays.png", dpi=100),
                save_figure(iou_bars(metrics["iou"]), out_dir / "per_class_iou.png", dpi=100),
                per_class_table(metrics["confusion"], info.classes, out_dir / "per_class_iou.csv")]

    def inference_module(self, model: M.DeepLabV3) -> nn.Module:
        return M.Logits(model)  # images in, class logits at the input size out

    def to_original(self, outputs: torch.Tensor, placements: list[Placement]) -> list[torch.Tensor]:
        return predictions.to_original(outputs, placements)  # padding cut away, resized to each original

    def records(self, outputs: list[torch.Tensor], info: DataInfo, options: PredictOptions) -> list[dict]:
        return predictions.records(outputs, info, options)

    def writer(self, out_dir: Path, info: DataInfo, options: PredictOptions) -> predictions.Masks:
        return predictions.Masks(out_dir, info, options, self.records)
