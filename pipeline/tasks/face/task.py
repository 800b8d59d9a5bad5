"""The face task: the contract of pipeline/tasks/base.py for an embedding model trained through a margin head."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import synth_faces
from pipeline.models import backbones
from pipeline.tasks import export_checks
from pipeline.tasks.base import DataInfo, ExportSpec, Facts, PredictOptions, Task, TaskData
from pipeline.tasks.face import predictions, verification
from pipeline.tasks.face.config import FaceData, FaceModelConfig
from pipeline.tasks.face.data import (
    IdentityDataset,
    VerificationDataset,
    load_verification,
    scan_identities,
    train_dir_problem,
)
from pipeline.tasks.face.margin import MarginHead
from pipeline.tasks.face.model import Embedder, FaceModel
from pipeline.tasks.face.report import write_roc


@dataclass
class FaceFacts(Facts):
    # each verification set's name, image count, pairs (flattened) and same/different flags
    verification: list[dict] = field(default_factory=list)
    batches_per_epoch: int = 1  # the margin warm-up counts steps


class Face(Task):
    name = "face"
    synth = "faces"  # the synthetic identities
    facts = FaceFacts
    # the neck flattens a fixed-size map; an embedding is checked by its direction (cosine), as faces are compared
    export = ExportSpec(output_names=("embeddings",), dynamic_size=False, check=export_checks.cosine)
    caches_features = True

    def default_transforms(self, data: FaceData) -> tuple[list[dict], list[dict]]:
        # Face crops come aligned: arcface_torch augments with horizontal flips only.
        resize = {"name": "Resize", "height": data.image_size, "width": data.image_size}
        return [resize, {"name": "HorizontalFlip", "p": 0.5}], [resize]

    def missing_data(self, data: FaceData) -> str | None:
        return train_dir_problem(Path(data.root) / data.train_dir)

    def build_data(self, data: FaceData, *, mean, std, seed: int) -> TaskData:
        train_tf, val_tf, random = self.transforms(data, mean=mean, std=std, seed=seed)
        root = Path(data.root)
        samples, identities = scan_identities(root / data.train_dir, data.min_images_per_identity)
        sets = [load_verification(root, name) for name in data.verification]
        train, val = IdentityDataset(samples, train_tf), VerificationDataset(sets, val_tf)
        facts = FaceFacts(
            verification=[{"name": s.name, "num_images": len(s.images), "pairs": s.pairs.ravel().tolist(),
                           "issame": s.issame.tolist()} for s in sets],
            batches_per_epoch=max(1, len(train) // data.batch_size))  # the loader drops the last partial batch
        info = DataInfo(classes=identities, train_size=len(train), val_size=len(val), mean=tuple(mean),
                        std=tuple(std), image_size=data.image_size, random_train_transforms=random, facts=facts)
        return TaskData(train, val, info)

    def build_model(self, model: FaceModelConfig, info: DataInfo) -> FaceModel:
        b = model.backbone
        backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random)
        m1, m2, m3 = model.margin.margins()
        warmup = round(model.margin.warmup_epochs * info.facts.batches_per_epoch)
        margin = MarginHead(model.embedding_dim, info.num_classes, model.margin.s, m1, m2, m3, warmup_steps=warmup)
        return FaceModel(backbone, info.image_size, model.embedding_dim, model.dropout, margin)

    def loss(self, model: FaceModel, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"margin": F.cross_entropy(model.margin(model(images), labels), labels)}

    def predict(self, model: FaceModel, batch) -> torch.Tensor:
        return F.normalize(model(batch[0]).float(), dim=1)

    def make_evaluator(self, info: DataInfo) -> verification.Evaluator:
        return verification.Evaluator(info.facts.verification)

    def tiny(self, folder: Path) -> dict[str, dict]:
        root = synth_faces.generate(folder, image_size=32, train_identities=4, images_per_identity=2,
                                    holdout_identities=4, holdout_images=2, pairs_per_fold=1)
        return {"data": {"root": str(root), "verification": ["holdout"], "image_size": 32, "batch_size": 2,
                         "num_workers": 0},
                "model": {"backbone": {"name": "resnet18", "weights": "none"}, "embedding_dim": 16}}

    def report(self, metrics: dict, info: DataInfo, out_dir: Path) -> list[Path]:
        """A ROC curve per verification set."""
        out_dir.mkdir(parents=True, exist_ok=True)
        return write_roc(metrics, [s["name"] for s in info.facts.verification], out_dir)

    def inference_module(self, model: FaceModel) -> nn.Module:
        return Embedder(model.backbone, model.embedding)  # the margin head (num_classes rows) stays behind

    def records(self, outputs: torch.Tensor, info: DataInfo, options: PredictOptions) -> list[dict]:
        return predictions.records(outputs, info, options)

    def writer(self, out_dir: Path, info: DataInfo, options: PredictOptions) -> predictions.Embeddings:
        return predictions.Embeddings(out_dir)
