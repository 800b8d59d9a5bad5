"""Face recognition: backbone -> embedding neck -> L2-normalised embedding, trained through an ArcFace / CosFace /
combined margin head on identity folders, evaluated by the 10-fold verification protocol on LFW-style pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from pipeline import backbones
from pipeline.config import DataConfig, ModelConfig, Section, TaskConfig
from pipeline.data.transforms import build_transforms, is_random
from pipeline.tasks.face import verification
from pipeline.tasks.face.data import IdentityDataset, VerificationDataset, load_verification, scan_identities
from pipeline.tasks.face.margin import MarginHead
from pipeline.tasks.face.model import Embedder, FaceModel
from pipeline.tasks.face.report import write_roc

# arcface_torch's defaults: ArcFace m=0.5, CosFace m=0.35 (0.35-0.4 in the CosFace paper).
DEFAULT_M = {"arcface": 0.5, "cosface": 0.35}
# insightface's combined margin (m1, m2, m3).
DEFAULT_COMBINED = (1.0, 0.3, 0.2)


class FaceData(DataConfig):
    root: str = "data/shapes/faces"
    image_size: int = Field(112, gt=0)
    mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    # Identity folders (<identity>/<image>), relative to root (or absolute).
    train_dir: str = "train"
    min_images_per_identity: int = Field(1, ge=1)
    # Sets under root: <name>.bin (insightface) or <name>/pairs.txt with <name>/<person>/ images (LFW).
    verification: list[str] = Field(["lfw"], min_length=1)


class MarginConfig(Section):
    type: Literal["arcface", "cosface", "combined"] = "arcface"
    s: float = Field(64.0, gt=0)
    # arcface: the additive angular margin (default 0.5); cosface: the additive cosine margin (default 0.35).
    m: float | None = Field(None, ge=0)
    # combined only: cos(m1·θ + m2) − m3 (default 1.0, 0.3, 0.2).
    m1: float | None = Field(None, gt=0)
    m2: float | None = Field(None, ge=0)
    m3: float | None = Field(None, ge=0)
    # Ramp the margins up from 0 over this many epochs (small datasets do not converge with the full margin).
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check_form(self) -> MarginConfig:
        combined = (self.m1, self.m2, self.m3)
        if self.type == "combined" and self.m is not None:
            raise ValueError("m is for arcface / cosface; the combined margin takes m1, m2, m3")
        if self.type != "combined" and any(v is not None for v in combined):
            raise ValueError(f"m1, m2, m3 are for type: combined; {self.type} takes m")
        return self

    def margins(self) -> tuple[float, float, float]:
        if self.type == "combined":
            return tuple(v if v is not None else d for v, d in zip((self.m1, self.m2, self.m3), DEFAULT_COMBINED))
        m = self.m if self.m is not None else DEFAULT_M[self.type]
        return (1.0, m, 0.0) if self.type == "arcface" else (1.0, 0.0, m)


class FaceModelConfig(ModelConfig):
    embedding_dim: int = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    margin: MarginConfig = MarginConfig()


class Config(TaskConfig):
    task: Literal["face"]
    data: FaceData = FaceData()
    model: FaceModelConfig = FaceModelConfig()


PRIMARY = verification.PRIMARY  # mean accuracy over the verification sets
SYNTH = "faces"  # the synthetic identities for data.synth_if_missing
LOG_FORMAT = "pt2"


def default_transforms(image_size: int) -> tuple[list[dict], list[dict]]:
    # Face crops come aligned: arcface_torch augments with horizontal flips only.
    resize = {"name": "Resize", "height": image_size, "width": image_size}
    return [resize, {"name": "HorizontalFlip", "p": 0.5}], [resize]


def build_data(data: FaceData, *, mean, std, seed: int):
    train_spec, val_spec = default_transforms(data.image_size)
    train_spec = data.train_transforms if data.train_transforms is not None else train_spec
    val_spec = data.val_transforms if data.val_transforms is not None else val_spec
    train_tf = build_transforms(train_spec, field="data.train_transforms", mean=mean, std=std, seed=seed)
    val_tf = build_transforms(val_spec, field="data.val_transforms", mean=mean, std=std, seed=seed)
    root = Path(data.root)
    samples, identities = scan_identities(root / data.train_dir, data.min_images_per_identity)
    sets = [load_verification(root, name) for name in data.verification]
    train_ds, val_ds = IdentityDataset(samples, train_tf), VerificationDataset(sets, val_tf)
    info = {"num_classes": len(identities), "train_size": len(train_ds), "val_size": len(val_ds),
            "image_size": data.image_size, "random_train_transforms": is_random(train_spec),
            # for the margin warm-up, which counts training steps (the loader drops the last partial batch)
            "batches_per_epoch": max(1, len(train_ds) // data.batch_size),
            "verification": [{"name": s.name, "num_images": len(s.images), "pairs": s.pairs.ravel().tolist(),
                              "issame": s.issame.tolist()} for s in sets]}
    return train_ds, val_ds, info


def build_model(model: FaceModelConfig, info: dict, say=print) -> FaceModel:
    b = model.backbone
    backbone = backbones.build_or_random(b.name, b.weights, b.fallback_to_random, say=say)
    m1, m2, m3 = model.margin.margins()
    warmup = round(model.margin.warmup_epochs * info["batches_per_epoch"])
    margin = MarginHead(model.embedding_dim, info["num_classes"], model.margin.s, m1, m2, m3, warmup_steps=warmup)
    return FaceModel(backbone, info["image_size"], model.embedding_dim, model.dropout, margin)


def loss(model: FaceModel, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    return {"margin": F.cross_entropy(model.margin(model(images), labels), labels)}


def predict(model: FaceModel, batch) -> torch.Tensor:
    return F.normalize(model(batch[0]).float(), dim=1)


def inference_module(model: FaceModel) -> nn.Module:
    return Embedder(model.backbone, model.embedding)


def example_input(image_size: int) -> torch.Tensor:
    # Two images: torch.export (MLflow's pt2 format) would fix a batch of one as the only allowed size.
    return torch.zeros(2, 3, image_size, image_size)


def make_evaluator(info: dict) -> verification.Evaluator:
    return verification.Evaluator(info["verification"])


def report(metrics: dict, info: dict, out_dir: Path) -> list[Path]:
    """A ROC curve per verification set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_roc(metrics, [s["name"] for s in info["verification"]], out_dir)
