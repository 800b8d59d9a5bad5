"""The face task's config sections (light: pydantic only, so reading a task file stays fast)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.sections import DataConfig, ModelConfig, Section, TaskConfig
from pipeline.tasks.metric import Metric

# arcface_torch's defaults: ArcFace m=0.5, CosFace m=0.35 (0.35-0.4 in the CosFace paper).
DEFAULT_M = {"arcface": 0.5, "cosface": 0.35}
# insightface's combined margin (m1, m2, m3).
DEFAULT_COMBINED = (1.0, 0.3, 0.2)

# mean 10-fold verification accuracy over the sets: picks the best checkpoint
PRIMARY = Metric("val/verif_acc", perfect=1.0)


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
