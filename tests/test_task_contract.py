"""Every registered task honours the contract of pipeline/tasks/base.py: built on tiny data through the runner's own
builders, it trains a step, evaluates, and its trained model is usable afterwards: predict and export.

Parametrized over the registry, so a new task is covered the moment it is registered.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import config
from pipeline.data import synth, synth_coco, synth_faces
from pipeline.tasks import registry, saved
from pipeline.tasks.base import DataInfo, PredictOptions, Task
from pipeline.train import checkpoint, engine, optim, runner
from pipeline.use import export, predict

SMALL_DETECTOR = {"frozen_bn": False, "min_size": 64, "max_size": 64, "anchor_sizes": [8, 16, 32, 64, 128],
                  "fpn_channels": 32, "representation_size": 64, "box_batch_size_per_image": 32,
                  "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 200,
                  "rpn_post_nms_top_n_test": 50}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract-data")
    scenes = synth_coco.generate(root / "coco", image_size=64, train_images=4, val_images=2)
    return {"classification": synth.generate(root / "cls", image_size=32, train_per_class=2, val_per_class=1),
            "detection": scenes, "segmentation": scenes,
            "face": synth_faces.generate(root / "faces", image_size=32, train_identities=4, images_per_identity=2,
                                         holdout_identities=4, holdout_images=2, pairs_per_fold=1)}


def _sections(name: str, root: Path) -> dict:
    data = {"root": str(root), "batch_size": 2, "num_workers": 0, "image_size": 32}
    model = {"backbone": {"name": "resnet18", "weights": "none"}}
    if name == "detection":
        data.pop("image_size")
        model.update(SMALL_DETECTOR)
    elif name == "segmentation":
        data.update(format="coco", image_size=64)
    elif name == "face":
        data["verification"] = ["holdout"]
        model["embedding_dim"] = 16
    return {"data": data, "model": model}


@pytest.fixture(params=sorted(registry.TASKS))
def built(request, datasets, tmp_path, uri):
    """One task through prepare, data, model, fine-tuning plan, placement, optimizer and loaders."""
    name = request.param
    path = tmp_path / "tasks" / f"{name}_tiny.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"task": name, **_sections(name, datasets[name]),
                                    "train": {"epochs": 1, "output_dir": str(tmp_path / "out")},
                                    "tracking": {"uri": uri, "log_model": False}}))
    setup = runner.prepare(path, say=lambda *_: None)
    data = runner.build_data(setup, say=lambda *_: None)
    model = runner.build_model(setup, data.info, say=lambda *_: None)
    plan = runner.plan_finetune(setup, model)
    model = runner.place_model(setup, model, plan)
    optimizer = runner.make_optimizer(setup, model, plan, say=lambda *_: None)
    loaders = runner.make_loaders(setup, data, model, plan)
    return setup, data, model, optimizer, loaders, tmp_path


def test_the_registry_names_each_task_and_its_light_schema():
    for name, entry in registry.TASKS.items():
        task = registry.get(name)
        assert isinstance(task, Task) and task.name == name and entry.schema.model_fields["task"].annotation
        assert entry.primary.name.startswith("val/") and task.export.output_names


def test_train_step_evaluate_predict_export(built):
    setup, data, model, optimizer, (train_loader, val_loader), tmp_path = built
    task, name = setup.task, setup.task.name
    info = data.info
    assert isinstance(info, DataInfo) and info.num_classes >= 2
    assert task.read_info(json.loads(json.dumps(info.to_dict()))) == info  # what checkpoints carry survives

    # train one step: the loss dict sums to a finite scalar and the step moves the weights
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    settings = runner.step_settings(setup)
    one_step = [next(iter(train_loader))]
    schedule = optim.Schedule("constant", 1)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    out = engine.train_one_epoch(model, task.loss, one_step, optimizer, schedule, None, engine.FitState(), settings,
                                 log=lambda *_: None)
    assert np.isfinite(out["train/loss_epoch"])
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))

    # evaluate: the primary metric is a number
    metrics = engine.evaluate(model, task.predict, task.make_evaluator(info), val_loader, settings,
                              merge=task.merges_evaluators)
    assert isinstance(metrics[registry.entry(name).primary.name], float)

    # the inference module maps the example input to outputs that `records` turns into one JSON-able dict per image
    saved.inference_ready(model)
    model.eval()
    example = task.example_input(setup.cfg.data.image_size)
    with torch.no_grad():
        outputs = task.inference_module(model)(example)
    records = task.records(outputs, info, PredictOptions(score=0.0))
    assert len(records) == len(example)
    json.dumps(records)

    # a checkpoint as the runner writes it is usable by predict and export
    ckpt = tmp_path / "best.pt"
    checkpoint.save({"model": model.state_dict(), "config": setup.cfg.model_dump(mode="json"),
                     "info": info.to_dict(), "fit": engine.FitState().as_dict(), "run_id": None}, ckpt)
    images = sorted(p for p in Path(setup.cfg.data.root).rglob("*.png") if "masks" not in p.parts)[:3]
    result = predict.run(str(ckpt), [str(p) for p in images], tmp_path / "predicted", say=lambda *_: None)
    assert result.predicted == len(images) and result.files and all(f.exists() for f in result.files)
    exported = export.run(str(ckpt), "onnx", tmp_path / f"{name}.onnx", say=lambda *_: None)
    assert exported.path.exists()


def test_config_validation_uses_the_registry_schemas():
    cfg = config.validate({"task": "segmentation"})
    assert isinstance(cfg, registry.entry("segmentation").schema)
