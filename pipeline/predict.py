"""`pipeline predict`: run a trained model on images and write task-appropriate files.

A source is a checkpoint file (`outputs/.../best.pt`), an MLflow run id (its `checkpoints/best.pt` artifact) or a
`models:/` URI (the logged model; its run's checkpoint supplies the config and class names). The model sees each
image through the task's validation transforms from the saved config, so it gets what it was evaluated on.

What a task writes is its part of the task contract (pipeline/tasks/base.py): `inference_transforms`,
`inference_module` and `writer`. Classification writes `predictions.csv` (file, rank, class, prob).
"""
from __future__ import annotations

import csv
import glob
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import allocator, backbones, checkpoint, config, engine, stages, tracking
from pipeline.data.images import IMAGE_EXTENSIONS, read_rgb
from pipeline.data.transforms import build_transforms
from pipeline.errors import UserError
from pipeline.tasks.base import DataInfo, PredictOptions
from pipeline.tasks.registry import TASKS

CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
# How many unreadable file names a skip message lists before "...".
_NAMES_SHOWN = 5


# ---------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Loaded:
    """A trained model in eval mode on the CPU, with what it was trained with."""

    model: nn.Module
    cfg: config.TaskConfig
    info: DataInfo  # what the data said, saved in the checkpoint (classes, category ids, ...)
    run_id: str | None  # the MLflow run that trained it, when known
    uri: str  # the tracking store that run lives in


def load(source: str, uri: str | None = None, logged_model: bool = True) -> Loaded:
    """The model and metadata behind `source`: a checkpoint path, a run id, or a `models:/` URI.

    For a `models:/` URI, `logged_model=False` rebuilds the model from its run's best checkpoint instead of loading
    the logged graph: the runner logs the model from that checkpoint, so the weights are the same, and the module can
    take any image size (export wants that).
    """
    if source.startswith("models:/"):
        store = tracking.resolve_uri(uri)
        run_id = tracking.model_source_run(store, source)
        ckpt = _run_checkpoint(store, run_id)
        cfg = _config(ckpt, source)
        if not logged_model:
            return Loaded(_rebuild(ckpt, cfg), cfg, DataInfo.from_dict(ckpt["info"]), run_id, store)
        model = tracking.load_model(store, source)  # a torch.export graph: exported in eval mode, has no eval()
        return Loaded(model, cfg, DataInfo.from_dict(ckpt["info"]), run_id, store)
    path = Path(source)
    if path.is_file():
        ckpt = checkpoint.load(path)
        cfg = _config(ckpt, source)
        store = tracking.resolve_uri(uri or cfg.tracking.uri)
        return Loaded(_rebuild(ckpt, cfg), cfg, DataInfo.from_dict(ckpt["info"]), ckpt.get("run_id"), store)
    if path.suffix in (".pt", ".pth") or "/" in source or path.exists():
        raise UserError(f"checkpoint '{source}' not found (or not a file); give a best.pt / last.pt written by "
                        "'pipeline run', an MLflow run id or a models:/ URI")
    store = tracking.resolve_uri(uri)
    ckpt = _run_checkpoint(store, source)
    cfg = _config(ckpt, source)
    return Loaded(_rebuild(ckpt, cfg), cfg, DataInfo.from_dict(ckpt["info"]), source, store)


def _run_checkpoint(uri: str, run_id: str) -> dict:
    tracking.get_run(uri, run_id)  # a clear error for an unknown run id before looking for its artifacts
    with tempfile.TemporaryDirectory(prefix="pipeline-ckpt-") as tmp:
        return checkpoint.load(tracking.download_artifact(uri, run_id, CHECKPOINT_ARTIFACT, tmp))


def _config(ckpt: dict, source: str) -> config.TaskConfig:
    if not isinstance(ckpt, dict) or not {"model", "config", "info"} <= set(ckpt):
        raise UserError(f"'{source}' is not a checkpoint of this pipeline (no model, config and info inside); "
                        "give a best.pt / last.pt written by 'pipeline run'")
    return config.validate(ckpt["config"], source=f"config saved in {source}")


def _rebuild(ckpt: dict, cfg: config.TaskConfig) -> nn.Module:
    """The task's model with random init (no weight download), then the checkpoint's weights."""
    backbone = cfg.model.backbone.model_copy(update={"weights": "none", "fallback_to_random": False})
    model_cfg = cfg.model.model_copy(update={"backbone": backbone})
    model = TASKS[cfg.task].build_model(model_cfg, DataInfo.from_dict(ckpt["info"]), say=lambda *_: None)
    model.load_state_dict(ckpt["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def find_images(inputs: list[str]) -> list[Path]:
    """Image files named by `inputs`: files, folders (searched recursively) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not matches:
                raise UserError(f"folder '{item}' holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.is_file():
            matches = [path]  # named explicitly: read_rgb decides whether it is an image
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"pattern '{item}' matches no files; check the path (quote it so the shell keeps it)")
        else:
            raise UserError(f"input '{item}' does not exist; give image files, folders or glob patterns")
        found += matches
    return list(dict.fromkeys(found))  # a file named twice is predicted once


class _Images(Dataset):
    """(index, image tensor), or (index, None) for a file that cannot be read, so one bad file skips only itself."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            image = read_rgb(self.paths[index])
        except UserError:
            return index, None
        return index, self.transform(image=image)["image"]


def _collate(items: list[tuple[int, torch.Tensor | None]]) -> tuple[list[int], torch.Tensor | None, list[int]]:
    good = [(i, image) for i, image in items if image is not None]
    bad = [i for i, image in items if image is None]
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, bad


# ---------------------------------------------------------------------------------------------------------------------
# Predict


@dataclass
class PredictResult:
    files: list[Path]  # what was written
    predicted: int  # images predicted
    skipped: list[Path]  # files that could not be read


def run(source: str, inputs: list[str], out: str | Path, uri: str | None = None, batch_size: int = 32,
        top_k: int = 5, device: str = "auto", say=print) -> PredictResult:
    """Predict every image of `inputs` in batches on the best device and write the task's files into `out`."""
    if batch_size < 1 or top_k < 1:
        raise UserError(f"--batch-size ({batch_size}) and --top-k ({top_k}) must be at least 1")
    allocator.keep_freed_memory()  # every batch frees what the next allocates
    paths = find_images(inputs)
    loaded = load(source, uri)
    task = TASKS[loaded.cfg.task]
    cfg = loaded.cfg
    default_mean, default_std = backbones.pretrained_mean_std(cfg.model.backbone.name)
    transform = build_transforms(task.inference_transforms(cfg), field="data.val_transforms (saved config)",
                                 mean=cfg.data.mean or default_mean, std=cfg.data.std or default_std)
    dev = engine.resolve_device(device)
    model = loaded.model.to(dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = task.writer(out, loaded.info, PredictOptions(top_k=top_k))
    loader = DataLoader(_Images(paths, transform), batch_size=batch_size, collate_fn=_collate,
                        num_workers=stages.auto_workers(dev), pin_memory=dev.type == "cuda")
    skipped: list[Path] = []
    with torch.inference_mode():
        for indices, images, bad in tqdm(loader, desc="predict", unit="batch", file=sys.stderr, dynamic_ncols=True):
            skipped += [paths[i] for i in bad]
            if images is not None:
                writer.add([paths[i] for i in indices], model(images.to(dev)).cpu())
    files = writer.finish()
    result = PredictResult(files, len(paths) - len(skipped), skipped)
    say(f"predicted {result.predicted} images on {dev} with {cfg.model.backbone.name}; wrote "
        f"{', '.join(str(f) for f in files)}")
    if skipped:
        names = ", ".join(str(p) for p in skipped[:_NAMES_SHOWN]) + (", ..." if len(skipped) > _NAMES_SHOWN else "")
        say(f"skipped {len(skipped)} unreadable files: {names}")
    return result
