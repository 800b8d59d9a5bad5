"""A trained model's inference side, shared by `pipeline predict`, `pipeline verify` and face galleries: load a source,
then read, transform and batch image files and return the model's outputs in the original images' pixels.

A source is a checkpoint file (`outputs/.../best.pt`), an MLflow run id or `runs:/<run id>` (its `checkpoints/best.pt`
artifact), or a `models:/` URI (the logged model; its run's checkpoint supplies the config and class names). Everything
goes through the task contract (pipeline/tasks/base.py): the image passes the task's `inference_transforms` (the ones
it was evaluated with), `inference_module` maps the batch to outputs and `to_original` maps those back through each
image's `Placement`; nothing here asks which task it runs.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline import config, console, tracking
from pipeline.data import loading
from pipeline.data.images import read_rgb
from pipeline.data.transforms import build_transforms
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.platform import devices
from pipeline.tasks import saved
from pipeline.tasks import tta as tta_module
from pipeline.tasks.base import DataInfo, Placement, Task
from pipeline.tasks.saved import Saved
from pipeline.train import checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Loaded:
    """A trained model (pipeline/tasks/saved.py) and the tracking store its run lives in."""

    saved: Saved
    uri: str  # the tracking store of the run that trained it

    @property
    def model(self) -> nn.Module:
        return self.saved.model

    @property
    def cfg(self) -> config.TaskConfig:
        return self.saved.cfg

    @property
    def info(self) -> DataInfo:
        return self.saved.info

    @property
    def run_id(self) -> str | None:
        return self.saved.run_id

    @property
    def fit(self) -> dict:
        return self.saved.fit


def load(source: str, uri: str | None = None) -> Loaded:
    """The model and metadata behind `source`: a checkpoint path, a run id, `runs:/<run id>` or a `models:/` URI.

    A `models:/` URI is rebuilt from its run's best checkpoint: the runner logs the model (pipeline/use/serve.py) from
    that checkpoint, so the weights are the same, and the task's whole model (not only its inference module) comes
    back.
    """
    path = Path(source)
    if not tracking.is_tracked(source):
        if path.is_file():
            found = saved.read(checkpoint.load(path), source)
            return Loaded(found, tracking.resolve_uri(uri or found.cfg.tracking.uri))
        if path.suffix in (".pt", ".pth") or "/" in source or path.exists():
            raise UserError(f"checkpoint '{source}' not found (or not a file); give a best.pt / last.pt written by "
                            "'pipeline run', an MLflow run id or a models:/ URI")
    # a run id, runs:/<id>[/<artifact path>], or a models:/ URI: see pipeline/tracking/sources.py
    store = tracking.resolve_uri(uri)
    ref = tracking.resolve_source(source, store)
    with tracking.downloaded(store, ref) as file:
        found = saved.read(checkpoint.load(file), source)
    found.run_id = ref.run_id  # the run it was asked for (a checkpoint copied between runs names its first)
    return Loaded(found, store)


# ---------------------------------------------------------------------------------------------------------------------
# Sessions


@dataclass
class Batch:
    """Part of a run over image files: the images predicted and their outputs, or the files that could not be read."""

    paths: list[Path]
    outputs: object  # what `task.to_original` returns for these images (None when there are none)
    skipped: list[Path]


@dataclass
class Session:
    """A source ready to predict: the task's inference module on a device and the image transform it expects."""

    source: str
    loaded: Loaded
    task: Task
    module: nn.Module
    transform: A.Compose
    device: torch.device

    @property
    def info(self) -> DataInfo:
        return self.loaded.info

    def require(self, task: str, what: str) -> None:
        """Refuse a source of another task than `what` (a command or option) works with, in one line."""
        if self.task.name != task:
            raise UserError(f"{self.source} is a {self.task.name} run; {what} needs a {task} model")

    def run(self, paths: list[Path], batch_size: int, skip_unreadable: bool = True,
            desc: str = "predict") -> Iterator[Batch]:
        """The outputs for `paths` in order, batch by batch. An unreadable file is skipped (named in `Batch.skipped`),
        or with `skip_unreadable=False` fails with the reader's one-line error."""
        dataset = _Images(paths, self.transform, skip_unreadable)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=list, pin_memory=self.device.type == "cuda",
                            num_workers=loading.auto_workers(self.device) if len(paths) > batch_size else 0)
        with torch.inference_mode():
            for items in console.bar(loader, desc, show=len(loader) > 1, unit="batch", leave=True, mininterval=0.1):
                bad = [paths[i] for i, image, _ in items if image is None]
                if bad:
                    yield Batch([], None, bad)
                for run in _same_shape_runs([item for item in items if item[1] is not None]):
                    images = torch.stack([image for _, image, _ in run]).to(self.device)
                    outputs = self.module(images).cpu()
                    placements = [placement for _, _, placement in run]
                    yield Batch([paths[i] for i, _, _ in run], self.task.to_original(outputs, placements), [])


def open_session(source: str, uri: str | None = None, device: str = "auto", tta: bool = False) -> Session:
    """Load `source` and prepare its task's inference module and transforms on `device`; with `tta`, a module that
    averages each image's outputs with its mirror's (pipeline/tasks/tta.py; classification and segmentation).

    A `models:/` source is rebuilt from its run's best checkpoint (see `load`).
    """
    loaded = load(source, uri)
    task = loaded.saved.task
    cfg = loaded.cfg
    default_mean, default_std = backbones.pretrained_mean_std(cfg.model.backbone.name)
    spec = task.inference_transforms(cfg)
    # The whole image as a box: where the transforms put it is the image's Placement (an empty spec moves nothing,
    # and albumentations warns about a box processor with no transform to use it).
    bbox_params = A.BboxParams(format="pascal_voc") if spec else None
    transform = build_transforms(spec, field="data.val_transforms (saved config)", mean=cfg.data.mean or default_mean,
                                 std=cfg.data.std or default_std, bbox_params=bbox_params)
    dev = devices.resolve_device(device)
    module = task.inference_module(loaded.model).eval().to(dev)
    if tta:
        module = tta_module.FlipAveraged(module, tta_module.mirror_back(task, "--tta"))
    return Session(source, loaded, task, module, transform, dev)


class _Images(Dataset):
    """(index, image tensor, placement), or (index, None, None) for a file that cannot be read, so one bad file skips
    only itself."""

    def __init__(self, paths: list[Path], transform: A.Compose, skip_unreadable: bool) -> None:
        self.paths = paths
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, Placement | None]:
        try:
            image = read_rgb(self.paths[index])
        except UserError:
            if not self.skip_unreadable:
                raise
            return index, None, None
        return index, *prepare(self.transform, image)


def prepare(transform: A.Compose, image: np.ndarray) -> tuple[torch.Tensor, Placement]:
    """An RGB image through a session's transform, and its Placement: where its pixels lie in the model's input
    (also what the served model, pipeline/use/serve.py, does with each image of a request)."""
    height, width = image.shape[:2]
    kwargs = {"bboxes": [[0, 0, width, height]]} if transform.processors else {}
    out = transform(image=image, **kwargs)
    tensor = out["image"]
    boxes = out.get("bboxes")
    box = tuple(float(v) for v in boxes[0][:4]) if boxes is not None and len(boxes) else \
        (0.0, 0.0, float(tensor.shape[-1]), float(tensor.shape[-2]))
    return tensor, Placement(height, width, box)


def _same_shape_runs(items: list[tuple]) -> list[list[tuple]]:
    """Consecutive items whose images share a shape: each run stacks into one batch, and input order is kept (images
    of different sizes, as detection and segmentation without a resize get them, cannot be stacked)."""
    runs: list[list[tuple]] = []
    for item in items:
        if runs and runs[-1][0][1].shape == item[1].shape:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def skipped_line(skipped: list[Path], what: str = "files", shown: int = 5) -> str:
    """"skipped 3 unreadable files: a.png, b.png, c.png", naming the first `shown`."""
    names = ", ".join(str(p) for p in skipped[:shown]) + (", ..." if len(skipped) > shown else "")
    return f"skipped {len(skipped)} unreadable {what}: {names}"
