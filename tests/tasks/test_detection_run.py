"""`pipeline run` of a detection task end to end on tiny synthetic shapes scenes, read back from MLflow."""
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import ConcatDataset, DataLoader

from pipeline import config, tracking
from pipeline.data import synth_coco
from pipeline.errors import UserError
from pipeline.platform import devices
from pipeline.tasks import registry
from pipeline.train import engine, optim, runner

pytestmark = pytest.mark.e2e

detection = registry.get("detection")

REPO = Path(__file__).resolve().parents[2]
SHAPE_IDS = set(synth_coco.CATEGORY_IDS.values())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_coco.generate(tmp_path_factory.mktemp("scenes"), image_size=64, train_images=4, val_images=2)


SMALL_MODEL = {"backbone": {"name": "resnet18", "weights": "none"}, "frozen_bn": False, "min_size": 64, "max_size": 64,
               "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32, "representation_size": 128,
               "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
               "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}


def test_short_training_raises_map(scenes: Path):
    """60 SGD steps from random init on 4 scenes: the engine's loop with the task's loss, predict and evaluator."""
    # validation on the training scenes: a few dozen steps can learn 4 scenes, not the shapes in general
    cfg = config.validate({"task": "detection", "model": SMALL_MODEL,
                           "data": {"root": str(scenes), "val_ann": "annotations/train.json",
                                    "val_images": "images/train", "train_transforms": []}})
    data = detection.build_data(cfg.data, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed=0)
    train, val, info = data.train, data.val, data.info
    torch.manual_seed(0)
    model = detection.build_model(cfg.model, info)
    steps = 60
    loader = DataLoader(ConcatDataset([train] * steps), batch_size=len(train), collate_fn=train.collate_fn)
    val_loader = DataLoader(val, batch_size=len(val), collate_fn=val.collate_fn)
    cpu = torch.device("cpu")
    settings = engine.StepSettings(device=cpu, precision=devices.resolve_precision("auto", cpu))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]

    def mean_ap() -> float:
        evaluator = detection.make_evaluator(info)
        return engine.evaluate(model, detection.predict, evaluator, val_loader, settings)["val/mAP"]

    before = mean_ap()
    schedule = optim.Schedule("constant", steps, warmup_steps=10)
    engine.train_one_epoch(model, detection.loss, loader, optimizer, schedule, None, engine.FitState(), settings,
                           log=lambda *_: None)
    after = mean_ap()
    assert before < 0.02 and after > 0.15


def test_run_logs_reports_and_model(trained_runs):
    """The session's detection run (tests/shared_runs.py): 10 epochs on 8 scenes, validated on themselves."""
    trained = trained_runs("detection")
    uri, output_dir = trained.uri, trained.checkpoint.parent
    client = MlflowClient(uri)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "detection"
    epochs = int(run.data.params["train.epochs"])
    assert [m.step for m in client.get_metric_history(trained.run_id, "val/mAP")] == list(range(1, epochs + 1))
    for key in ("val/AP50", "val/AP75", "val/APs", "val/APm", "val/AR100", "val/AP/circle", "best/mAP"):
        assert client.get_metric_history(trained.run_id, key), key
    assert {a.path for a in client.list_artifacts(trained.run_id, "report")} == \
           {"report/val_predictions.json", "report/per_class_ap.csv", "report/val_boxes.png"}
    predictions = json.loads((output_dir / "report" / "val_predictions.json").read_text())
    val = json.loads((trained.data / run.data.params["data.val_ann"]).read_text())
    assert predictions and {p["category_id"] for p in predictions} <= SHAPE_IDS  # the annotation file's own ids
    assert {p["image_id"] for p in predictions} <= {image["id"] for image in val["images"]}
    table = (output_dir / "report" / "per_class_ap.csv").read_text().splitlines()
    assert table[0] == "class,category_id,AP,AP50" and len(table) == 7
    with tracking.process_tracking_uri(uri):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [trained.run_id]
    logged = tracking.load_model(uri, models[0].model_uri)
    rows = int(run.data.params["model.box_detections_per_img"])
    with torch.no_grad():
        assert logged(detection.example_input(64)).shape == (2, rows, 6)


def test_coco_task_validates_and_fails_clearly_without_coco(uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(REPO / "tasks" / "detection_coco.yaml")
    assert cfg.model.backbone.name == "resnet50" and cfg.train.step_milestones == [16, 22]
    with pytest.raises(UserError, match=r"data.train_ann: annotation file 'data/coco/annotations/"
                                        r"instances_train2017.json' not found"):
        runner.run(REPO / "tasks" / "detection_coco.yaml", (f"tracking.uri={uri}",))
    # checked before a run exists: no experiment, no run, no folder is left behind
    assert MlflowClient(uri).get_experiment_by_name("detection_coco") is None and not Path("outputs").exists()


def test_shapes_task_validates():
    cfg = config.load(REPO / "tasks" / "detection_shapes.yaml")
    assert cfg.task == "detection" and cfg.data.synth_if_missing and cfg.model.min_size == 128
