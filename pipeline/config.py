"""Task configuration: the pydantic schema, YAML loading with `defaults:` fragments, and `key.path=value` overrides.

A task file names its task (`task: classification`) and may list fragments from `configs/`
(`defaults: [backbone/resnet18, optim/adamw]`). Fragments merge in order, the task file last, then the command-line
overrides. The merged dict is validated strictly against the task's schema (`TASKS[task].Config`): an unknown key,
a wrong type or an out-of-range value raises `UserError` naming the key path and what is allowed.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import shipped
from pipeline.errors import UserError

# The fragments inside the installed package (a checkout's configs/ through a symlink): the `defaults:` fallback.
PACKAGE_CONFIGS = shipped.CONFIGS


class Section(BaseModel):
    # Strict and immutable: a typo is an error, and no stage can change what another stage was given.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(Section):
    name: str = "resnet18"
    # imagenet (timm's default tag) | a timm tag such as tv_in1k | a local file | none
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
    lr: float = Field(1e-3, gt=0)
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
    # None: outputs/<task file stem>/<backbone>
    output_dir: str | None = None
    log_every: int = Field(10, gt=0)
    max_nonfinite: int = Field(5, gt=0)
    # Under torchrun: BatchNorm statistics over the global batch instead of each process's share.
    sync_bn: bool = False
    # torch.compile the model for training and evaluation (compiles on the first steps; benchmarks/compile_step.py).
    compile: bool = False
    # auto: on a CPU device, the CPU fast paths of pipeline/cpu_kernels.py (small-map convs as GEMMs, AdamW without
    # layout copies, gather RoIAlign, kept heap memory); off: the stock PyTorch and torchvision operations everywhere.
    cpu_kernels: Literal["auto", "off"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _cpu_kernels_off(cls, data: Any) -> Any:
        # YAML reads a bare `off` (in a file or as train.cpu_kernels=off) as false.
        if isinstance(data, dict) and data.get("cpu_kernels") is False:
            return {**data, "cpu_kernels": "off"}
        return data


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: str | None = None
    # None: the task file's stem.
    experiment: str | None = None
    log_model: bool = True
    log_checkpoint: bool = True


class TaskConfig(Section):
    """The sections every task shares; each task subclasses it with its own `data` and `model` sections."""

    task: str
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TaskConfig:
    """Read a task file, merge its fragments and the overrides, and validate against the task's schema."""
    raw = compose(path, overrides)
    return validate(raw, source=str(path))


def compose(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The merged, unvalidated dict: fragments in order, then the task file, then `key.path=value` overrides."""
    path = shipped.find_task(path)  # an existing file, else a built-in task name such as `quickstart`
    merged = _load_with_defaults(path, _config_dirs(path), depth=0)
    for item in overrides:
        apply_override(merged, item)
    return merged


def validate(raw: dict, source: str = "config") -> TaskConfig:
    from pipeline.tasks import TASKS  # the registry imports task modules, which import this module

    task = raw.get("task")
    if task not in TASKS:
        hint = _closest(str(task), TASKS)
        raise UserError(f"{source}: task: '{task}' is not a task; valid: {', '.join(TASKS)}{hint}")
    schema = TASKS[task].Config
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err, schema)}") from None


def apply_override(cfg: dict, item: str) -> None:
    """Set `a.b.c=value` in place; the value is parsed as YAML, so `[stem,layer1]` is a list and `1e-3` a float."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' is not of the form key.path=value (e.g. train.lr=0.01)")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise UserError(f"override '{item}': the value is not valid YAML ({_one_line(err)})") from None
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    messages = [_format_one(e, schema) for e in err.errors()]
    more = f" (and {len(messages) - 1} more: {'; '.join(messages[1:3])})" if len(messages) > 1 else ""
    return messages[0] + more


def _format_one(error: dict, schema: type[BaseModel]) -> str:
    loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-after", "list[", "dict["))]
    path = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(schema, loc[:-1])
        return f"unknown key '{path}'{_closest(loc[-1], valid, prefix='.'.join(loc[:-1]))}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    return f"{path or 'config'}: {shown} is not allowed: {error['msg']}"


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _closest(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    names = [f"{prefix}.{c}" if prefix else c for c in close]
    return f"; did you mean {' or '.join(names)}?"


def _config_dirs(task_file: Path) -> list[Path]:
    # A project copied elsewhere keeps tasks/ and configs/ side by side; the package's own configs/ is the fallback.
    dirs = [(task_file.resolve().parent.parent / "configs").resolve(), PACKAGE_CONFIGS]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def _load_with_defaults(path: Path, config_dirs: list[Path], depth: int) -> dict:
    if depth > 8:
        raise UserError(f"{path}: `defaults:` nest more than 8 levels deep (a fragment including itself?)")
    data = read_yaml(path)
    merged: dict = {}
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise UserError(f"{path}: defaults must be a list of fragment names such as [backbone/resnet18]")
    for name in defaults:
        merged = deep_merge(merged, _load_with_defaults(_find_fragment(str(name), path, config_dirs), config_dirs, depth + 1))
    return deep_merge(merged, data)


def _find_fragment(name: str, used_in: Path, config_dirs: list[Path]) -> Path:
    for d in config_dirs:
        candidate = d / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if candidate.is_file():
            return candidate
    available = sorted({str(p.relative_to(d).with_suffix("")) for d in config_dirs for p in d.rglob("*.yaml")})
    raise UserError(f"{used_in}: defaults: fragment '{name}' not found in configs/{_closest(name, available)}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: broken YAML: {_one_line(err)}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (task:, data:, model:, ...), got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def to_yaml(cfg: TaskConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
