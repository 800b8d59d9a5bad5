"""Every registered task honours the contract of pipeline/tasks/base.py: built from its own tiny data through the
runner's own builders, it trains a step, evaluates, and its trained model is usable afterwards: predict and export.

Parametrized over the registry, so a new task is covered the moment it is registered: the toy task at the end of this
file (a regression, lower is better) is registered inside its test and passes the same checks with no other edit.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from pipeline import config
from pipeline.config.sections import DataConfig, ModelConfig, TaskConfig
from pipeline.data.dataset import TaskDataset
from pipeline.data.images import read_rgb
from pipeline.models import backbones
from pipeline.tasks import registry, saved
from pipeline.tasks.base import DataInfo, ExportSpec, PredictOptions, Task, TaskData
from pipeline.tasks.common import write_csv
from pipeline.tasks.metric import Metric
from pipeline.train import builders, checkpoint, engine, optim, runner
from pipeline.use import export, predict

pytestmark = pytest.mark.e2e


def check_contract(name: str, folder: Path, uri: str) -> None:
    """Task `name` through the contract: its tiny data, the runner's builders, a train step, evaluation, what its
    checkpoint carries, inference records, predict and export of a checkpoint."""
    task, entry = registry.get(name), registry.entry(name)
    assert isinstance(task, Task) and task.name == name
    path = folder / "tasks" / f"{name}_tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"task": name, **task.tiny(folder / "data"),
                                    "train": {"epochs": 1, "output_dir": str(folder / "out")},
                                    "tracking": {"uri": uri, "log_model": False}}))
    setup = runner.prepare(path)
    assert isinstance(setup.cfg, entry.schema) and setup.primary == entry.primary
    data = builders.build_data(setup)
    model = builders.build_model(setup, data.info)
    plan = builders.plan_finetune(setup, model)
    model = builders.place_model(setup, model, plan)
    optimizer = builders.make_optimizer(setup, model, plan)
    train_loader, val_loader = builders.make_loaders(setup, data, model, plan)

    # the data: datasets that list the files they read and reseed their own augmentation; what it says survives
    for dataset in (data.train, data.val):
        assert isinstance(dataset, TaskDataset) and len(dataset) > 0
        files = dataset.files()
        assert files and all(Path(f).is_file() for f in files)
    info = data.info
    assert isinstance(info, DataInfo) and info.num_classes >= 1
    assert (info.facts is None) == (task.facts is None) and (task.facts is None or isinstance(info.facts, task.facts))
    assert task.read_info(json.loads(json.dumps(info.to_dict()))) == info  # what checkpoints carry survives
    data.train.reseed(7)
    first = data.train[0]
    data.train.reseed(7)
    again = data.train[0]
    assert torch.equal(_image(first), _image(again))  # one seed, one augmentation

    # train one step: the loss dict sums to a finite scalar and the step moves the weights
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    settings = builders.step_settings(setup)
    one_step = [next(iter(train_loader))]
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    out = engine.train_one_epoch(model, task.loss, one_step, optimizer, optim.Schedule("constant", 1), None,
                                 engine.FitState(), settings, log=lambda *_: None)
    assert np.isfinite(out["train/loss_epoch"])
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))

    # evaluate: the primary metric is a finite number (checked against the saved checkpoint's below)
    metrics = engine.evaluate(model, task.predict, task.make_evaluator(info), val_loader, settings,
                              merge=task.merges_evaluators)
    assert isinstance(metrics[entry.primary.name], float) and np.isfinite(metrics[entry.primary.name])
    report = task.report(metrics, info, folder / "report")
    assert report and all(p.is_file() and p.stat().st_size > 0 for p in report)

    # the inference module maps the example input to outputs that `records` turns into one JSON-able dict per image
    saved.inference_ready(model)
    model.eval()
    example = task.example_input(setup.cfg.data.image_size)
    with torch.no_grad():
        outputs = task.inference_module(model)(example)
    records = task.records(outputs, info, PredictOptions(score=0.0))
    assert len(records) == len(example) and all(isinstance(r, dict) and r for r in records)
    json.dumps(records)

    # a checkpoint as the runner writes it is usable by predict and export
    ckpt = folder / "best.pt"
    checkpoint.save({"model": model.state_dict(), "config": setup.cfg.model_dump(mode="json"),
                     "info": info.to_dict(), "fit": engine.FitState().as_dict(), "run_id": None}, ckpt)
    # the checkpoint holds all the metric depends on: the model rebuilt from it scores what this one scores
    primary = entry.primary.name
    here = engine.evaluate(model, task.predict, task.make_evaluator(info), val_loader, settings)[primary]
    rebuilt = saved.read(checkpoint.load(ckpt), str(ckpt))
    again = engine.evaluate(rebuilt.model, task.predict, task.make_evaluator(rebuilt.info), val_loader, settings)
    assert np.isfinite(here) and again[primary] == pytest.approx(here, rel=1e-6, abs=1e-9), (here, again[primary])
    images = sorted(p for p in Path(setup.cfg.data.root).rglob("*.png") if "masks" not in p.parts)[:3]
    result = predict.run(str(ckpt), [str(p) for p in images], folder / "predicted")
    assert result.predicted == len(images) and result.files and all(f.exists() for f in result.files)
    exported = export.run(str(ckpt), "onnx", folder / f"{name}.onnx")
    assert exported.path.exists()


def _image(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


@pytest.mark.parametrize("name", sorted(registry.TASKS))
def test_every_registered_task_honours_the_contract(name: str, tmp_path: Path, uri: str):
    check_contract(name, tmp_path, uri)


def test_the_registry_declares_each_task_s_schema_and_primary_metric():
    for name, entry in registry.TASKS.items():
        assert entry.schema.model_fields["task"].annotation == Literal[name]
        assert entry.primary.name.startswith("val/") and entry.primary.goal in ("max", "min")
        assert registry.get(name) is registry.get(name)  # built once


OLD_FACTS = {  # what checkpoints of each task kept among the shared fields of their `info`, before task facts
    "detection": {"category_ids": [3, 7]},
    "segmentation": {"ignore_index": 254},
    "face": {"verification": [{"name": "lfw", "num_images": 4, "pairs": [0, 1, 2, 3], "issame": [True, False]}],
             "batches_per_epoch": 5},
}


@pytest.mark.parametrize("name", sorted(OLD_FACTS))
def test_checkpoints_written_before_task_facts_still_read(name: str):
    task = registry.get(name)
    shared = {"classes": ["a", "b"], "train_size": 4, "val_size": 2, "mean": [0.5] * 3, "std": [0.25] * 3,
              "image_size": 32, "random_train_transforms": False}
    unset = {"category_ids": [], "ignore_index": None, "verification": [], "batches_per_epoch": 1}  # other tasks'
    info = task.read_info({**shared, **unset, **OLD_FACTS[name]})
    assert info.facts == task.facts(**OLD_FACTS[name])
    assert info.classes == ["a", "b"] and info.mean == (0.5, 0.5, 0.5) and info.image_size == 32


def test_config_validation_uses_the_registry_schemas():
    cfg = config.validate({"task": "segmentation"})
    assert isinstance(cfg, registry.entry("segmentation").schema)


# ---------------------------------------------------------------------------------------------------------------------
# A fifth task, written here and registered inside the test below: the contract needs nothing else of it.


class BrightnessData(DataConfig):
    root: str = "data/brightness"
    image_size: int = 32


class BrightnessConfig(TaskConfig):
    task: Literal["brightness"]
    data: BrightnessData = BrightnessData()
    model: ModelConfig = ModelConfig()


class Greys(TaskDataset):
    """Images of one grey level each; the target is that level, 0..1."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_rgb(self.paths[index])
        return self.transform(image=image)["image"], torch.tensor([image.mean() / 255.0], dtype=torch.float32)

    def files(self) -> list[Path]:
        return list(self.paths)


class Regressor(nn.Module):
    def __init__(self, backbone: backbones.Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)[self.backbone.out_stages[-1]].mean(dim=(2, 3)))

    def head_parts(self):
        return {"head": self.head}


class MeanAbsoluteError:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, outputs: torch.Tensor, batch) -> None:
        self.total += (outputs.float() - batch[1]).abs().sum().item()
        self.count += len(outputs)

    def compute(self) -> dict:
        return {"val/mae": self.total / max(1, self.count)}


@dataclass
class Rows:
    path: Path
    rows: list

    def add(self, paths, outputs) -> None:
        self.rows += [(str(p), f"{v:.4f}") for p, v in zip(paths, outputs[:, 0].tolist())]

    def finish(self) -> list[Path]:
        return [write_csv(self.path, ["file", "brightness"], self.rows)]


class Brightness(Task):
    name = "brightness"
    synth = "brightness"
    export = ExportSpec(output_names=("brightness",), dynamic_size=True)

    def default_transforms(self, data):
        resize = {"name": "Resize", "height": data.image_size, "width": data.image_size}
        return [resize, {"name": "HorizontalFlip", "p": 0.5}], [resize]

    def build_data(self, data, *, mean, std, seed: int) -> TaskData:
        train_tf, val_tf, random = self.transforms(data, mean=mean, std=std, seed=seed)
        root = Path(data.root)
        train = Greys(sorted((root / "train").glob("*.png")), train_tf)
        val = Greys(sorted((root / "val").glob("*.png")), val_tf)
        return TaskData(train, val, DataInfo(classes=["brightness"], train_size=len(train), val_size=len(val),
                                             mean=tuple(mean), std=tuple(std), image_size=data.image_size,
                                             random_train_transforms=random))

    def build_model(self, model, info):
        return Regressor(backbones.build(model.backbone.name, model.backbone.weights))

    def loss(self, model, batch):
        return {"mse": F.mse_loss(model(batch[0]).float(), batch[1])}

    def predict(self, model, batch):
        return model(batch[0])

    def make_evaluator(self, info):
        return MeanAbsoluteError()

    def report(self, metrics, info, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        return [write_csv(out_dir / "mae.csv", ["metric", "value"], [["val/mae", metrics["val/mae"]]])]

    def tiny(self, folder: Path) -> dict[str, dict]:
        for split, count in (("train", 4), ("val", 2)):
            (folder / split).mkdir(parents=True)
            for i in range(count):
                level = 40 + 50 * i + (20 if split == "val" else 0)
                Image.new("RGB", (40, 28), (level, level, level)).save(folder / split / f"{i}.png")
        return {"data": {"root": str(folder), "image_size": 32, "batch_size": 2, "num_workers": 0},
                "model": {"backbone": {"name": "resnet18", "weights": "none"}}}

    def inference_module(self, model):
        return model

    def records(self, outputs, info, options):
        return [{"brightness": float(v)} for v in outputs[:, 0].tolist()]

    def writer(self, out_dir, info, options):
        return Rows(out_dir / "brightness.csv", [])


def test_a_fifth_task_registered_here_passes_the_contract(tmp_path: Path, uri: str, monkeypatch):
    monkeypatch.setitem(registry.TASKS, "brightness",
                        registry.Entry(BrightnessConfig, Metric("val/mae", goal="min"), Brightness))
    check_contract("brightness", tmp_path, uri)
    assert registry.entry("brightness").primary.better(0.1, 0.2)  # an error: lower is better
