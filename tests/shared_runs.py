"""Trained runs that the whole session shares: one per task, trained on first use into one MLflow sqlite store, with
its model logged. Tests that only read a trained run (what it logged, its checkpoint, its logged model served over
HTTP, predicted with or exported) take it from the `trained_runs` fixture (conftest.py) instead of training their own:
each task trains once a session, not once per module.

A reader may add to the store (an artifact, a run of another experiment) but never changes what a run logged.
Each task's run is the one its own end-to-end test (tests/tasks/test_*_run.py, tests/test_run.py) checks.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import yaml
from said import said_lines

from pipeline import tracking
from pipeline.data import synth_coco, synth_faces
from pipeline.train import checkpoint, runner

RESNET18 = {"name": "resnet18", "weights": "none"}
# A detector small enough for seconds of CPU: 64 px short side, few channels, proposals and sampled RoIs.
DETECTOR = {"backbone": RESNET18, "frozen_bn": False, "min_size": 64, "max_size": 128,
            "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32, "representation_size": 128,
            "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
            "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 20}
FACE_SIZE = 64  # at 32 px a ResNet-18 barely tells the synthetic identities apart in a test's budget
EMBEDDING_DIM = 64


@dataclass
class Trained:
    """A finished run of `task` and where its pieces are."""

    task: str
    run_id: str
    uri: str
    folder: Path  # the store's folder: the working directory the run logged from (artifacts under ./mlruns)
    task_file: Path  # the task file it ran
    checkpoint: Path  # its best.pt
    model_uri: str  # its logged model, models:/m-...
    data: Path  # its data root
    images: list[Path]  # validation images of its data, in name order
    classes: list[str]
    category_ids: list[int]  # detection: the annotation file's ids of the classes; [] for other tasks
    best: float  # the best checkpoint's primary metric
    primary: str
    said: list[str] = field(default_factory=list)  # what the run said on the console


@dataclass(frozen=True)
class Spec:
    """One task's run: its task file's name and sections; its data comes from `data(folder)`, which writes it and
    returns its root (None: the session's `shapes` images)."""

    name: str
    sections: dict
    data: Callable[[Path], Path] | None
    images: Callable[[Path], list[Path]]  # the validation images under the data root


def _shapes_val(root: Path) -> list[Path]:
    return sorted((root / "val").rglob("*.png"))


def _scenes_val(root: Path) -> list[Path]:
    return sorted((root / "images" / "val").glob("*.png"))


SPECS = {
    # the quickstart's shape, small: 32 px shapes (the session's `shapes`), a frozen stem, grad norms, one thread
    "classification": Spec("tiny", {
        "data": {"image_size": 32, "batch_size": 16, "train_transforms": [{"name": "HorizontalFlip", "p": 0.5}],
                 "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
        "model": {"backbone": RESNET18},
        "finetune": {"freeze": ["stem"]},
        "train": {"epochs": 3, "lr": 2e-3, "log_every": 2, "log_grad_norms": True, "threads": 1}},
        data=None, images=_shapes_val),
    # 8 scenes of 64 px, validated on themselves (a few dozen steps learn 8 scenes, not the shapes in general);
    # validation resizes the longest side to 64, so predict and serving scale boxes back
    "detection": Spec("shapes_detection", {
        "data": {"image_size": 64, "batch_size": 2, "val_ann": "annotations/train.json", "val_images": "images/train",
                 "val_transforms": [{"name": "LongestMaxSize", "max_size": 64}]},
        "model": DETECTOR,
        "train": {"epochs": 10, "optimizer": "sgd", "lr": 0.02, "schedule": "constant", "warmup_epochs": 1,
                  "weight_decay": 1e-4, "clip_grad_norm": 5.0}},
        data=lambda folder: synth_coco.generate(folder / "scenes", image_size=64, train_images=8, val_images=1),
        images=lambda root: sorted((root / "images" / "train").glob("*.png"))),
    # scored on the scenes it trains on: from random init, generalising to new scenes takes minutes
    # (tasks/segmentation_shapes.yaml does that); here a few steps must visibly fit them
    "segmentation": Spec("seg", {
        "data": {"format": "coco", "image_size": 32, "batch_size": 4, "val_split": "train",
                 "train_transforms": [{"name": "HorizontalFlip", "p": 0.5}]},
        "model": {"backbone": RESNET18, "output_stride": 8},
        "finetune": {"bn": "train"},
        "train": {"epochs": 8, "lr": 3e-3, "schedule": "poly"}},
        data=lambda folder: synth_coco.generate(folder / "seg_scenes", image_size=32, train_images=16, val_images=4),
        images=_scenes_val),
    # training raises verification accuracy on held-out identities
    "face": Spec("face_tiny", {
        "data": {"verification": ["holdout"], "image_size": FACE_SIZE, "batch_size": 16},
        "model": {"backbone": RESNET18, "embedding_dim": EMBEDDING_DIM,
                  "margin": {"type": "arcface", "s": 32, "m": 0.5, "warmup_epochs": 1}},
        "finetune": {"bn": "train"},
        "train": {"epochs": 6, "lr": 2e-3, "warmup_epochs": 1, "log_every": 2}},
        data=lambda folder: synth_faces.generate(folder, image_size=FACE_SIZE, train_identities=16,
                                                 images_per_identity=8, holdout_identities=10, holdout_images=4,
                                                 pairs_per_fold=6),
        images=lambda root: sorted((root / "holdout").rglob("*.jpg"))),
}


class TrainedRuns:
    """task -> its Trained run, trained the first time it is asked for."""

    def __init__(self, folder: Path, shapes: Path) -> None:
        self.folder = folder
        self.uri = f"sqlite:///{folder}/mlflow.db"
        self.shapes = shapes
        self.done: dict[str, Trained] = {}

    def __call__(self, task: str) -> Trained:
        if task not in self.done:
            self.done[task] = self._train(task)
        return self.done[task]

    def _train(self, task: str) -> Trained:
        spec = SPECS[task]
        root = self.shapes if spec.data is None else spec.data(self.folder)
        sections = spec.sections
        cfg = {"task": task, "seed": 0, **sections,
               "data": {**sections["data"], "root": str(root), "num_workers": 0},
               "train": {**sections["train"], "output_dir": str(self.folder / "out" / task),
                         "keep_checkpoints": "best"},
               "tracking": {"uri": self.uri, "log_model": True}}
        path = self.folder / "tasks" / f"{spec.name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        with said_lines() as lines, pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.folder)  # MLflow artifacts go under ./mlruns
            result = runner.run(path)
        experiment = mlflow.MlflowClient(self.uri).get_experiment_by_name(spec.name).experiment_id
        with tracking.process_tracking_uri(self.uri):
            (model,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
        info = checkpoint.load(result.output_dir / checkpoint.BEST)["info"]
        return Trained(task=task, run_id=result.run_id, uri=self.uri, folder=self.folder, task_file=path,
                       checkpoint=result.output_dir / checkpoint.BEST, model_uri=f"models:/{model.model_id}",
                       data=root, images=spec.images(root), classes=info["classes"],
                       category_ids=(info.get("facts") or {}).get("category_ids", []), best=result.best,
                       primary=result.primary, said=list(lines))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
