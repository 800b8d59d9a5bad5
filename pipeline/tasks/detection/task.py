"""The detection task: the contract of pipeline/tasks/base.py for Faster R-CNN with an FPN on the backbone."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import torch
from torch import nn

from pipeline.data import synth_coco
from pipeline.data.transform_checks import RESIZES
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.tasks.base import DataInfo, ExportSpec, Facts, Placement, PredictOptions, Task, TaskData
from pipeline.tasks.common import save_figure
from pipeline.tasks.detection import balance, predictions
from pipeline.tasks.detection import export as detection_export
from pipeline.tasks.detection.config import DetectionData, DetectionModel
from pipeline.tasks.detection.data import CocoDetection, annotation_problem, drop_unreadable, read_coco, select_images
from pipeline.tasks.detection.evaluate import Evaluator
from pipeline.tasks.detection.model import Detector, build_detector, frozen_bn, load_coco
from pipeline.tasks.detection.report import boxes_figure, per_class_table, write_results

log = logging.getLogger(__name__)


@dataclass
class DetectionFacts(Facts):
    category_ids: list[int] = field(default_factory=list)  # the dataset's category id of label k + 1 (0: background)


class BoxesOut(nn.Module):
    """What MLflow logs: a normalised image batch in, one tensor out, (N, detections_per_img, 6) rows of
    (x1, y1, x2, y2, score, category_id) in the input's pixels and the dataset's category ids; unused rows are 0
    with category -1."""

    def __init__(self, detector: Detector, category_ids: list[int]) -> None:
        super().__init__()
        self.detector = detector
        self.register_buffer("category_ids", torch.tensor(category_ids, dtype=torch.float32))
        self.rows = detector.roi_heads.detections_per_img

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        detections = self.detector(list(images))
        out = images.new_zeros(len(detections), self.rows, 6)
        out[:, :, 5] = -1
        for i, d in enumerate(detections):
            n = len(d["boxes"])
            out[i, :n, :4] = d["boxes"]
            out[i, :n, 4] = d["scores"]
            out[i, :n, 5] = self.category_ids[d["labels"] - 1]
        return out


class Detection(Task):
    name = "detection"
    synth = "coco"  # the synthetic shapes scenes
    facts = DetectionFacts
    # traced per image inside a scripted batch loop (export.py there), checked by matching boxes
    export = ExportSpec(output_names=("detections",), dynamic_size=True, check=detection_export.match_detections,
                        script=detection_export.script)
    collate_fn = staticmethod(CocoDetection.collate_fn)
    fixed_input_size = False  # the detector resizes each image by model.min_size / max_size: sizes vary
    # The evaluator maps boxes back to the annotation file's pixels by each axis' scale (evaluate.py): a flip, crop,
    # pad or rotation would shift every box against the ground truth.
    val_geometry = RESIZES

    def default_transforms(self, data: DetectionData) -> tuple[list[dict], list[dict]]:
        # The detector resizes to model.min_size / max_size itself; the data side only augments.
        return [{"name": "HorizontalFlip", "p": 0.5}], []

    def missing_data(self, data: DetectionData) -> str | None:
        return (annotation_problem(Path(data.root) / data.train_ann, "data.train_ann")
                or annotation_problem(Path(data.root) / data.val_ann, "data.val_ann"))

    def backbone_weights(self, model: DetectionModel) -> str:
        return "none" if model.init == "coco" else model.backbone.weights  # the COCO detector brings its own

    def build_data(self, data: DetectionData, *, mean, std, seed: int) -> TaskData:
        root = Path(data.root)
        # Boxes follow every geometric transform; one that leaves less than a pixel of a box drops the box.
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_width=1, min_height=1, clip=True)
        train_tf, val_tf, random = self.transforms(data, mean=mean, std=std, seed=seed, bbox_params=bbox_params)
        train = read_coco(root / data.train_ann, root / data.train_images, "data.train_ann")
        val = read_coco(root / data.val_ann, root / data.val_images, "data.val_ann")
        if val.category_ids != train.category_ids:
            raise UserError(f"data.val_ann: its categories (ids {val.category_ids}) differ from data.train_ann's "
                            f"({train.category_ids}); both files need the same 'categories' list")
        train_records, val_records = train.images, val.images
        if data.skip_bad_images:
            train_records = drop_unreadable(train_records, "data.train_ann")
            val_records = drop_unreadable(val_records, "data.val_ann")
        if not any((~rec.crowd).any() for rec in val_records):
            raise UserError(f"data.val_ann: '{root / data.val_ann}' has no usable box, so mAP is undefined; "
                            "annotate the validation images")
        train_ds = CocoDetection(select_images(train_records, data.keep_empty, "data.train_ann"), train_tf,
                                 group_aspect_ratio=data.group_aspect_ratio, ann_file=root / data.train_ann)
        val_ds = CocoDetection(val_records, val_tf, ann_file=root / data.val_ann)
        counts = balance.images_per_category(train_ds.records, len(train.classes))
        if data.balance == "repeat_factor":
            train_ds.sampling_weights = balance.repeat_factors(train_ds.records, counts, data.repeat_threshold)
        info = DataInfo(classes=train.classes, train_size=len(train_ds), val_size=len(val_ds), mean=tuple(mean),
                        std=tuple(std), image_size=data.image_size, random_train_transforms=random,
                        facts=DetectionFacts(train.category_ids), class_counts=counts)
        return TaskData(train_ds, val_ds, info)

    def batch_sampler(self, dataset: CocoDetection, sampler, batch_size: int):
        return dataset.group_batches(sampler, batch_size)

    def build_model(self, model: DetectionModel, info: DataInfo) -> Detector:
        b = model.backbone
        if model.init == "coco":
            if b.name != "resnet50":
                raise UserError(f"model.init: coco loads torchvision's COCO-trained ResNet-50 FPN detector, so it "
                                f"needs model.backbone.name=resnet50 (got {b.name}); use model.init: backbone for "
                                f"{b.name}")
            backbone = backbones.build(b.name, "none")  # the detector's weights replace the backbone's
        else:
            backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random)
            if model.frozen_bn and backbone.weights == "none":
                log.info("note: model.frozen_bn with a random-init backbone leaves it without normalisation; "
                    "set model.frozen_bn: false to train its BatchNorm")
        if model.frozen_bn:
            backbone = frozen_bn(backbone)
        knobs = model.model_dump(exclude={"backbone", "init", "frozen_bn"})
        detector = build_detector(backbone, info.facts.category_ids, **knobs)
        if model.init == "coco":
            load_coco(detector, model.version)
            version = "_v2" if model.version == "v2" else ""
            detector.backbone.weights = f"coco (fasterrcnn_resnet50_fpn{version})"
        return detector

    def loss(self, model: Detector, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        return model(images, targets)

    def predict(self, model: Detector, batch) -> list[dict[str, torch.Tensor]]:
        return model(batch[0])

    def make_evaluator(self, info: DataInfo) -> Evaluator:
        return Evaluator(info.classes, info.facts.category_ids, info.mean, info.std)

    def tiny(self, folder: Path) -> dict[str, dict]:
        root = synth_coco.generate(folder, image_size=64, train_images=4, val_images=2)
        # a small detector: 64 px, few channels, proposals and sampled RoIs
        model = {"backbone": {"name": "resnet18", "weights": "none"}, "frozen_bn": False, "min_size": 64,
                 "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32, "representation_size": 64,
                 "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
                 "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50}
        return {"data": {"root": str(root), "batch_size": 2, "num_workers": 0}, "model": model}

    def report(self, metrics: dict, info: DataInfo, out_dir: Path) -> list[Path]:
        """The validation predictions (COCO results json), per-class AP table and a picture of predicted and true
        boxes."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return [write_results(metrics["results"], out_dir / "val_predictions.json"),
                per_class_table(metrics["per_class"], info.facts.category_ids, out_dir / "per_class_ap.csv"),
                save_figure(boxes_figure(metrics["samples"], info.classes), out_dir / "val_boxes.png")]

    def inference_module(self, model: Detector) -> nn.Module:
        return BoxesOut(model, model.category_ids)

    def to_original(self, outputs: torch.Tensor, placements: list[Placement]) -> torch.Tensor:
        return predictions.to_original(outputs, placements)  # boxes scaled and shifted back

    def records(self, outputs: torch.Tensor, info: DataInfo, options: PredictOptions) -> list[dict]:
        return predictions.records(outputs, info, options)

    def writer(self, out_dir: Path, info: DataInfo, options: PredictOptions) -> predictions.CocoResults:
        return predictions.CocoResults(out_dir, info, options, self.records)
