"""The task contract: everything the runner, `predict`, `export` and the logged MLflow model ask of a task.

A task is a subclass of `Task`, registered by name in `pipeline/tasks/registry.py` with its config schema (its own
`data` and `model` sections) and its primary metric (`Metric`: the name that picks the best checkpoint and stops early,
and whether higher or lower is better). The runner never asks which task it runs and never probes for abilities: what a
task can do is declared here, as class attributes with defaults.

Training side
- `build_data(...) -> TaskData`: the train and val datasets (each a `TaskDataset`, pipeline/data/dataset.py: it lists
  the files it reads and reseeds its own augmentation) plus `DataInfo`, the typed record of what the data says: what
  every task's data says (class names, sizes, normalisation), and the task's own `facts` (a `Facts` dataclass declared
  as `Task.facts`, e.g. detection's category ids). It is saved in every checkpoint and read back by `read_info`, so a
  trained model carries it.
- `build_model(...)`: a `TaskModel`, an `nn.Module` with `.backbone` (named stages, see pipeline/models/backbones.py)
  and `head_parts()` (an ordered dict of named head modules, which fine-tuning gives their own learning rates).
- `loss(model, batch) -> dict[str, Tensor]`: the engine sums the dict, except the entry named `TRAIN_ERROR`: a task that
  can tell puts there the fraction of the batch it got wrong (detached), and the engine logs its epoch mean as
  `train/error` (the training error the ResNet paper plots against depth).
- `predict(model, batch)`: eval-mode outputs for the evaluator; `make_evaluator(info)` -> `Evaluator`, whose metrics
  hold the primary one.
- `report(metrics, info, out_dir)`: the task's pictures and tables (files; the runner logs them).
- `tiny(folder)`: a few images of the task's data and the config sections that train on them in seconds, for the
  contract test that every registered task passes (tests/test_task_contract.py).

Inference side (one contract serves `pipeline predict`, `pipeline export`, the logged MLflow model and serving)
- `inference_transforms(cfg)`: the albumentations spec an image goes through before the model (the validation one).
- `inference_module(model)`: normalised images (N, 3, H, W) in, tensors out; `export` describes that module's outputs
  and how an exported copy is checked against it.
- `to_original(outputs, placements)`: those outputs mapped from the model input's pixels to each original image's
  (boxes scaled and shifted, logits cropped and resized); `Placement` says where an original lies in the input.
- `records(outputs, info, options)`: one JSON-able dict per image, in the dataset's names and ids (served answers).
- `example_input(image_size)`: what export traces with.
- `writer(out_dir, info, options)`: turns batches of inference outputs into files (CSV, COCO json, masks, .npy).

Transform rules (checked once at the start of a run, pipeline/data/transform_checks.py)
- `fixed_input_size`: train and val transforms must both give data.image_size square images (detection: False, the
  detector resizes each image by model.min_size / max_size itself, so sizes vary).
- `val_geometry`: the spatial transforms (albumentations' DualTransform: they move pixels, boxes and masks) a validation
  spec may hold; None allows any. `val_transform_problem` says why one spec entry would corrupt the metric.

Optional abilities (declared, never probed)
- `caches_features`: the model has `features(images)` and an `input_is_features` switch (finetune.cache_features).
- `merges_evaluators`: evaluators have `merge(other)`, so data-parallel ranks can each score a shard of the val set.
- `one_class_per_image`: each image has one label (classification), so a val set smaller than the number of classes
  leaves some class unvalidated (warned at start, pipeline/train/checks.py).
- `collate_fn`: the task batches its own way (detection: lists of images of different sizes).
- `batch_sampler(dataset, sampler, batch_size)`: may reorder training batches (detection groups by aspect ratio).
- `mirror_outputs`: how outputs of a horizontally mirrored image map back onto the image (classification: as they are;
  segmentation: mirrored back), for flip averaging (eval.tta, predict --tta; pipeline/tasks/tta.py); None: no flip
  averaging. Batches of such a task hold the image tensor (N, 3, H, W) first.
- `mixer(mixup, cutmix, num_classes, seed)`: blends training batches and their labels (train.mixup, train.cutmix;
  the task's schema allows them, `TaskConfig.mixes_labels`); its `loss` takes the soft targets it returns.
- a dataset's `sampling_weights` (pipeline/data/dataset.py): `build_data` sets them for data.balance, and training
  draws the images by them.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config.sections import DataConfig, ModelConfig, TaskConfig
from pipeline.data.dataset import TaskDataset
from pipeline.data.transforms import build_transforms, is_random
from pipeline.models.backbones import Backbone
from pipeline.tasks import export_checks

TRAIN_ERROR = "error"  # the key in `Task.loss`'s dict that is not a loss (see above)


class Facts:
    """A task's own record of what its data says (detection: the dataset's category ids), beside what every task's
    data says (`DataInfo`). Subclasses are dataclasses of JSON-able fields: they travel in checkpoints with DataInfo."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Facts:
        """The fields `d` holds (other keys ignored); a field it lacks takes its default."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class DataInfo:
    """What the data says about itself: what every task's data says, and the task's own `facts`. Saved in every
    checkpoint (`to_dict`), read back by predict, export and the logged model (`Task.read_info`), so names and ids
    travel with the weights."""

    classes: list[str]  # label names in label order; face: the training identities
    train_size: int
    val_size: int
    mean: tuple[float, float, float]  # the normalisation the model was trained with
    std: tuple[float, float, float]
    image_size: int  # data.image_size (detection resizes by model.min_size / max_size instead)
    random_train_transforms: bool = False  # feature caching refuses random augmentation without cached views
    facts: Facts | None = None  # the task's own record (`Task.facts`), e.g. detection's category ids
    # training images per class in label order (classification: of that class; detection: holding a box of that
    # category), for the imbalance warning at start; None where a task does not count them
    class_counts: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # facts as a dict of their fields

    @classmethod
    def from_dict(cls, d: dict[str, Any], facts: type[Facts] | None = None) -> DataInfo:
        """`d` as `to_dict` wrote it, the task's facts read as `facts`. Also reads the `info` dicts of older
        checkpoints: those kept the task's facts among the shared fields (category_ids, ignore_index, verification,
        batches_per_epoch), the oldest were untyped (extra keys such as `num_classes` are dropped, and face
        checkpoints without identity names get numbered ones)."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"facts"}
        values = {k: v for k, v in d.items() if k in shared}
        if "classes" not in values:
            values["classes"] = [str(i) for i in range(int(d.get("num_classes", 0)))]
        values.setdefault("mean", (0.485, 0.456, 0.406))
        values.setdefault("std", (0.229, 0.224, 0.225))
        values.setdefault("image_size", 0)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        own = d.get("facts") if isinstance(d.get("facts"), dict) else d  # before facts: at the top level
        return cls(**values, facts=facts.from_dict(own) if facts is not None else None)


@dataclass
class TaskData:
    train: TaskDataset
    val: TaskDataset
    info: DataInfo


class Evaluator(Protocol):
    """Accumulates eval outputs batch by batch; `compute` returns metrics (floats under `val/...`, the task's primary
    metric among them, plus whatever the report needs). Tasks with `merges_evaluators` also implement `merge(other)`."""

    def update(self, outputs: Any, batch: Any) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class TaskModel(Protocol):
    """What `Task.build_model` returns: fine-tuning (pipeline/train/finetune.py) works on the backbone's stages and the
    head's parts by name."""

    backbone: Backbone

    def head_parts(self) -> OrderedDict[str, nn.Module]: ...


class PredictionWriter(Protocol):
    """Turns inference outputs into files. `add` gets one batch, in input order: the image files and their outputs from
    `to_original` (on the CPU, in the originals' pixels); a writer that draws on the images (boxes, mask overlays)
    reads them again from `paths`. `finish` returns the files (or folders of files) written."""

    def add(self, paths: list[Path], outputs: Any) -> None: ...

    def finish(self) -> list[Path]: ...


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = 5  # classification: classes per image
    score: float = 0.5  # detection: draw boxes at or above this score


@dataclass(frozen=True)
class Placement:
    """Where an original image lies in the model's input after the inference transforms: the original's size and the
    box (x1, y1, x2, y2, input pixels) its pixels cover there. Resizing scales the box, padding shifts it; mapping an
    output through it undoes both, whatever the spec (inference transforms may resize and pad, never crop or flip)."""

    height: int
    width: int
    box: tuple[float, float, float, float]

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per input pixel, (x, y)."""
        x1, y1, x2, y2 = self.box
        return self.width / max(x2 - x1, 1e-6), self.height / max(y2 - y1, 1e-6)


@dataclass(frozen=True)
class ExportSpec:
    """What `inference_module(model)` returns, for ONNX / TorchScript export and its check against PyTorch."""

    output_names: tuple[str, ...]
    dynamic_size: bool  # whether the graph takes any image size (a ResNet classifier pools globally)
    # how the exported file's outputs are compared with PyTorch's (pipeline/tasks/export_checks.py): what agreement
    # means for these outputs, e.g. the same class per pixel rather than the same logits
    check: Callable[[export_checks.Batches, export_checks.Batches], export_checks.Agreement] = export_checks.allclose
    # the module as TorchScript, for a module that tracing alone cannot export (detection loops over the images of a
    # batch); None: export traces the module (TorchScript) or runs torch.export on it (ONNX)
    script: Callable[[nn.Module, torch.Tensor], torch.jit.ScriptModule] | None = None


class Task(ABC):
    name: ClassVar[str]
    synth: ClassVar[str]  # the synthetic dataset kind for data.synth_if_missing (pipeline/data/shapes.py)
    export: ClassVar[ExportSpec]
    facts: ClassVar[type[Facts] | None] = None  # the task's own record in DataInfo.facts, if it keeps one
    # transform rules
    fixed_input_size: ClassVar[bool] = True
    val_geometry: ClassVar[frozenset[str] | None] = None
    # optional abilities
    caches_features: ClassVar[bool] = False
    merges_evaluators: ClassVar[bool] = False
    one_class_per_image: ClassVar[bool] = False
    collate_fn: ClassVar[Callable | None] = None
    mirror_outputs: ClassVar[Callable[[Any], Any] | None] = None

    def read_info(self, d: dict[str, Any]) -> DataInfo:
        """The DataInfo a checkpoint saved (`DataInfo.to_dict`), with this task's facts."""
        return DataInfo.from_dict(d, self.facts)

    # -- training side -------------------------------------------------------------------------------------------

    @abstractmethod
    def default_transforms(self, data: DataConfig) -> tuple[list[dict], list[dict]]:
        """(train, val) albumentations specs used where the config gives none."""

    @abstractmethod
    def build_data(self, data: DataConfig, *, mean, std, seed: int) -> TaskData: ...

    @abstractmethod
    def build_model(self, model: ModelConfig, info: DataInfo) -> TaskModel: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def predict(self, model: nn.Module, batch): ...

    @abstractmethod
    def make_evaluator(self, info: DataInfo) -> Evaluator: ...

    @abstractmethod
    def report(self, metrics: dict, info: DataInfo, out_dir: Path) -> list[Path]: ...

    @abstractmethod
    def tiny(self, folder: Path) -> dict[str, dict]:
        """A tiny run of this task, for the contract test (tests/test_task_contract.py): write a few small images of its
        data under `folder` and return the `data` and `model` sections of a task file that trains on them in
        seconds (random init, small batches, no loader workers)."""

    def missing_data(self, data: DataConfig) -> str | None:
        """Why the data cannot be there, as far as a look at the file system tells before a run opens (None: it may
        be). The runner asks before it creates an MLflow run or a folder, so a mistyped data.root leaves nothing
        behind. Tasks whose data lives in files beside the root (annotation files, pairs lists) say so."""
        root = Path(data.root)
        if not root.is_dir():
            return (f"data.root: '{data.root}' does not exist ({root.resolve()}); point data.root at your {self.name} "
                    "data")
        return None

    def backbone_weights(self, model: ModelConfig) -> str:
        """The backbone weights `build_model` loads: model.backbone.weights, unless the task's own initialisation
        replaces them (detection's model.init: coco)."""
        return model.backbone.weights

    def batch_sampler(self, dataset: Dataset, sampler, batch_size: int):
        """The training sampler, or one that reorders it so that batches share a trait."""
        return sampler

    def mixer(self, mixup: float, cutmix: float, num_classes: int, seed: int) -> Callable | None:
        """What blends a training batch, `mixer(batch, (epoch, index)) -> batch`; None: the task does not mix."""
        return None

    # -- inference side ------------------------------------------------------------------------------------------

    @abstractmethod
    def inference_module(self, model: nn.Module) -> nn.Module:
        """Normalised images (N, 3, H, W) in, the task's output tensors out, in eval mode."""

    def to_original(self, outputs, placements: list[Placement]):
        """A batch of `inference_module` outputs (on the CPU) in the original images' pixels: what `records` and
        writers take. Outputs without geometry (class logits, embeddings) come back as they are."""
        return outputs

    @abstractmethod
    def records(self, outputs, info: DataInfo, options: PredictOptions) -> list[dict[str, Any]]:
        """One JSON-able dict per image of a batch of outputs from `to_original` (on the CPU, at the images' original
        size; segmentation: one (C, H, W) logits tensor per image), in the dataset's own names and ids: what the
        served model answers and what writers build on.
        classification: {"class", "prob", "top_k": [{"class", "prob"}, ...]};
        detection: {"detections": [{"bbox": [x1, y1, x2, y2], "score", "category_id", "category"}, ...]} (>= score);
        segmentation: {"mask_png": base64 PNG of class indices in the dataset's palette, "height", "width",
        "classes": [names present]}; face: {"embedding": [floats], L2-normalised}."""

    @abstractmethod
    def writer(self, out_dir: Path, info: DataInfo, options: PredictOptions) -> PredictionWriter: ...

    def example_input(self, image_size: int) -> torch.Tensor:
        # Two images: torch.export specialises a dimension of size 1, so a batch of one would be the only one allowed.
        return torch.zeros(2, 3, image_size, image_size)

    def inference_transforms(self, cfg: TaskConfig) -> list[dict]:
        """The albumentations spec the model was evaluated with: what an image goes through before inference."""
        return self.specs(cfg.data)[1]

    def val_transform_problem(self, entry: dict, data: DataConfig) -> str | None:
        """Why one entry of the validation spec (a spatial transform) would corrupt this task's metric, and what to do
        instead; None where it would not. The evaluator scores predictions against labels that went through the same
        transforms, mapped back only as far as `val_geometry` allows."""
        if self.val_geometry is None or entry["name"] in self.val_geometry:
            return None
        return (f"{entry['name']} moves pixels, and {self.name} validation maps predictions back only through "
                f"{', '.join(sorted(self.val_geometry))}; remove it (validation may resize and normalise; "
                "augmentation belongs in data.train_transforms)")

    # -- shared by the tasks -------------------------------------------------------------------------------------

    def specs(self, data: DataConfig) -> tuple[list[dict], list[dict]]:
        """The (train, val) specs in force: the config's, else the task's defaults."""
        train, val = self.default_transforms(data)
        return (data.train_transforms if data.train_transforms is not None else train,
                data.val_transforms if data.val_transforms is not None else val)

    def transforms(self, data: DataConfig, *, mean, std, seed: int, bbox_params=None):
        """(train transform, val transform, whether the train spec is random) built from `specs`."""
        train_spec, val_spec = self.specs(data)
        # (An empty spec gets no bbox processor: albumentations warns about one with nothing to process.)
        train = build_transforms(train_spec, field="data.train_transforms", mean=mean, std=std, seed=seed,
                                 bbox_params=bbox_params if train_spec else None)
        val = build_transforms(val_spec, field="data.val_transforms", mean=mean, std=std, seed=seed,
                               bbox_params=bbox_params if val_spec else None)
        return train, val, is_random(train_spec)
