"""The config sections every task shares (pydantic models). Each task's schema (pipeline/tasks/<task>/config.py)
subclasses `TaskConfig` with its own `data` and `model` sections; pipeline/config/load.py loads and validates task
files."""
from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    # Strict and immutable: a typo is an error, and no stage can change what another stage was given.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(Section):
    name: str = "resnet18"
    # imagenet (timm's default tag) | a timm tag such as tv_in1k | hf-hub:<org>/<repo> | a local file | none |
    # runs:/<run id> (that run's best checkpoint, of any task) | models:/<name>/<version> | models:/<name>@<alias>
    weights: str = "imagenet"
    # Only the quickstart sets this: without reachable weights it continues from random init, loudly.
    fallback_to_random: bool = False


class DataConfig(Section):
    root: str = "data/shapes/classification"
    image_size: int = Field(224, gt=0)
    batch_size: int = Field(32, gt=0)
    num_workers: int | Literal["auto"] = "auto"
    # None: the backbone's pretrained normalisation.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    train_transforms: list[dict[str, Any]] | None = None
    val_transforms: list[dict[str, Any]] | None = None
    skip_bad_images: bool = False
    # Generate the synthetic shapes dataset at `root`'s parent when it is missing (demos and the quickstart).
    synth_if_missing: bool = False
    # Rare classes seen more often: none here; classification (sampler, loss) and detection (repeat_factor) widen it.
    balance: Literal["none"] = "none"


class ModelConfig(Section):
    backbone: BackboneConfig = BackboneConfig()


class FinetuneConfig(Section):
    freeze: list[str] | Literal["all"] = []
    bn: Literal["frozen", "eval", "train"] = "frozen"
    lr_mult: dict[str, float] = {}
    layer_decay: float | None = Field(None, gt=0, le=1)
    unfreeze: dict[str, int] = {}
    no_decay_norm_bias: bool = True
    cache_features: bool = False
    # With random train transforms, cache this many augmented views of each training image (0: refuse).
    cached_views: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_lr(self) -> FinetuneConfig:
        for stage, mult in self.lr_mult.items():
            if mult < 0:
                raise ValueError(f"lr_mult.{stage}={mult} must be >= 0")
        return self


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    # auto: the learning-rate range test (pipeline/train/range_test.py, settings in lr_find:) runs first and its
    # suggestion is used; every stage keeps its lr_mult ratio to it.
    lr: float | Literal["auto"] = 1e-3
    weight_decay: float = Field(0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    step_milestones: list[int] = []
    step_gamma: float = Field(0.1, gt=0, le=1)
    poly_power: float = Field(0.9, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    device: str = "auto"
    accum_steps: int = Field(1, gt=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    patience: int | None = Field(None, gt=0)
    # None: outputs/<experiment>/<backbone> (pipeline/config/placement.py)
    output_dir: str | None = None
    # What a finished run leaves in output_dir (pipeline/train/checkpoint.py): none = nothing (its MLflow run holds the
    # best weights); best = best.pt (model weights only); last = best.pt and last.pt (model, optimizer, RNG: what
    # --resume needs); all = also last.prev.pt, the one before last.pt.
    keep_checkpoints: Literal["none", "best", "last", "all"] = "last"
    log_every: int = Field(10, gt=0)
    max_nonfinite: int = Field(5, gt=0)
    # Under torchrun: BatchNorm statistics over the global batch instead of each process's share.
    sync_bn: bool = False
    # torch.compile the model for training and evaluation (compiles on the first steps; benchmarks/compile_step.py).
    compile: bool = False
    # auto: on a CPU device, the CPU fast paths of pipeline/platform/cpu_kernels.py (small-map convs as GEMMs, AdamW
    # without layout copies, gather RoIAlign, kept heap memory); off: the stock PyTorch and torchvision operations
    # everywhere.
    cpu_kernels: Literal["auto", "off"] = "auto"
    # Intra-op CPU threads. auto: the CPUs this process may use (affinity, cgroup quota) less those other processes
    # keep busy, looked at again every few seconds (pipeline/platform/threads.py); OMP_NUM_THREADS, when set, is taken
    # as is.
    threads: int | Literal["auto"] = "auto"
    # grad_norm/<stage> of every trainable stage each log_every steps (gradient flow through depth; one host read)
    log_grad_norms: bool = False
    # Decay of an exponential moving average of the weights (BatchNorm statistics too), e.g. 0.999: the average is
    # what is evaluated and checkpointed (pipeline/train/ema.py). None: the weights as trained.
    ema: float | None = None
    # Alphas of the Beta distribution that mixup (blend two images) and cutmix (paste a box of one into another) draw
    # their mixing ratio from, as timm's train script; 0 turns each off. Classification only: they mix labels.
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_positive(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:  # YAML reads 1e-3 (no dot) as text: numbers written so are numbers here, as pydantic takes them
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if number > 0 and math.isfinite(number):
            return number
        raise ValueError(f"must be a learning rate > 0 (e.g. 0.001) or auto (the range test picks it), not {value!r}")

    @field_validator("ema")
    @classmethod
    def _ema_decay(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError("the average's decay must lie between 0 and 1 (e.g. 0.999: each step moves it 0.1% "
                             "towards the weights); null turns it off")
        return value

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_positive(cls, value: Any) -> int | str:
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
            return int(value)
        raise ValueError(f"must be auto or a number of threads >= 1, not {value!r}")

    @model_validator(mode="before")
    @classmethod
    def _cpu_kernels_off(cls, data: Any) -> Any:
        # YAML reads a bare `off` (in a file or as train.cpu_kernels=off) as false.
        if isinstance(data, dict) and data.get("cpu_kernels") is False:
            return {**data, "cpu_kernels": "off"}
        return data


# `register` below is also ABCMeta.register on the class (pydantic models are ABCs): instances read the field, nothing
# calls the method on a section, so pydantic's warning about the shadowed name is silenced for this one field.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig" shadows', category=UserWarning)


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: str | None = None
    # None: the task file's stem.
    experiment: str | None = None
    log_model: bool = True
    log_checkpoint: bool = True
    # MLflow's system metrics (CPU, memory, GPU with nvidia-ml-py installed) every this many seconds; 0 turns them off
    system_metrics_every: float = Field(10.0, ge=0)
    # A registered model's name: a successful run registers its logged model as that model's next version, with task,
    # backbone, depth and primary metric as version tags (`pipeline register RUN --name NAME` does it afterwards).
    register: str | None = None
    # The metrics the MLflow UI opens on (pipeline/tracking/ui.py): a column each in the runs table, sorted by depth,
    # and a scatter plot each against depth above the other charts. None: the best primary score, model/depth,
    # model/gflops, model/num_params, train/wall_time_s. The degradation task files name training error and loss.
    ui_metrics: list[str] | None = Field(None, min_length=1)

    @field_validator("register")
    @classmethod
    def _register_needs_model(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name and info.data.get("log_model") is False:
            raise ValueError("needs tracking.log_model: true (a registered version is the run's logged model)")
        return name


class Resources(Section):
    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)


class SweepConfig(Section):
    """How `pipeline sweep` runs its children with --jobs or --ray (pipeline/study/)."""

    # What each child asks Ray for; unset: one GPU where the cluster has GPUs, else the cores of one --jobs slot.
    resources: Resources = Resources()
    # Ray: how many times a child whose worker died (a node lost, an out-of-memory kill) is started again.
    retries: int = Field(0, ge=0)
    # Each child on this many GPUs of its own, data-parallel under torchrun.
    gpus_per_child: int = Field(1, ge=1)


class EvalConfig(Section):
    # Validation averages each image's outputs with its mirror's (horizontal flip; classification and segmentation).
    tta: bool = False


class LrFindConfig(Section):
    """The learning-rate range test (`pipeline lr-find`, `train.lr: auto`): pipeline/train/range_test.py."""

    start_lr: float = Field(1e-7, gt=0)
    end_lr: float = Field(10.0, gt=0)
    steps: int = Field(100, ge=5, le=1000)  # at most this many optimizer steps; fewer when the loss diverges
    # steepest: where the smoothed loss falls fastest (a loss that never falls: the largest lr before it climbs);
    # minimum: a tenth of the largest lr before it climbs (pipeline/train/range_test.py)
    suggest: Literal["steepest", "minimum"] = "steepest"

    @model_validator(mode="after")
    def _ramp_up(self) -> LrFindConfig:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"lr_find.end_lr={self.end_lr:g} must be above lr_find.start_lr={self.start_lr:g}")
        return self


class TaskConfig(Section):
    """The sections every task shares; each task subclasses it with its own `data` and `model` sections."""

    # What a task's schema allows beyond the shared sections (a subclass sets them): train.mixup / train.cutmix mix
    # the labels of whole images; eval.tta averages outputs with the mirrored image's.
    mixes_labels: ClassVar[bool] = False
    flip_tta: ClassVar[bool] = False

    task: str
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    lr_find: LrFindConfig = LrFindConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _task_abilities(self) -> TaskConfig:
        t = self.train
        if (t.mixup or t.cutmix) and not self.mixes_labels:
            used = " and ".join(f"train.{k}={getattr(t, k):g}" for k in ("mixup", "cutmix") if getattr(t, k))
            raise ValueError(f"{used}: mixup and cutmix blend whole images and their one label each, which "
                             f"{self.task} does not have (classification only); remove it")
        if self.eval.tta and not self.flip_tta:
            raise ValueError(f"eval.tta: flip averaging is for classification and segmentation, not {self.task} (face "
                             "embeddings already add each image's mirror); remove eval.tta")
        if (t.mixup or t.cutmix or self.eval.tta) and self.finetune.cache_features:
            raise ValueError("finetune.cache_features trains on features computed once from unmixed, unmirrored "
                             "images; train.mixup, train.cutmix and eval.tta need the images: drop them or the cache")
        return self
