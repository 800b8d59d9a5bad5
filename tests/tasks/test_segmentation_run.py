"""`pipeline run` of the segmentation task end to end on tiny synthetic scenes, read back from MLflow."""
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.cli import main
from pipeline.data import synth_coco

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return synth_coco.generate(tmp_path_factory.mktemp("scenes"), image_size=32, train_images=16, val_images=4)


def _task(tmp_path: Path, root: Path, uri: str, **sections) -> Path:
    cfg = {
        "task": "segmentation",
        # Scored on the scenes it trains on: from random init, generalising to new scenes takes minutes
        # (tasks/segmentation_shapes.yaml does that); here a few steps must visibly fit them.
        "data": {"root": str(root), "format": "coco", "image_size": 32, "batch_size": 4, "num_workers": 0,
                 "val_split": "train", "train_transforms": [{"name": "HorizontalFlip", "p": 0.5}],
                 "val_transforms": []},
        "model": {"backbone": {"name": "resnet18", "weights": "none"}, "output_stride": 8},
        "finetune": {"bn": "train"},
        "train": {"epochs": 8, "lr": 3e-3, "schedule": "poly", "output_dir": str(tmp_path / "out")},
        "tracking": {"uri": uri, "log_model": False},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_raises_miou_and_logs_metrics_report_and_model(trained_runs):
    """The session's segmentation run (tests/shared_runs.py): 16 scenes of 32 px, scored on themselves, 8 epochs."""
    trained = trained_runs("segmentation")
    uri = trained.uri
    client = MlflowClient(uri)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "segmentation"
    assert run.data.tags["num_classes"] == "7"
    miou = [m.value for m in client.get_metric_history(trained.run_id, "val/mIoU")]
    assert len(miou) == 8 and miou[-1] > miou[0] + 0.08, miou  # it learns
    for key in ("val/pixel_acc", "val/mean_acc", "val/loss", "val/iou/background", "best/mIoU"):
        assert client.get_metric_history(trained.run_id, key), key
    assert {a.path for a in client.list_artifacts(trained.run_id, "report")} == \
           {"report/overlays.png", "report/per_class_iou.png", "report/per_class_iou.csv"}
    with tracking.process_tracking_uri(uri):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [trained.run_id]


def test_cached_features_are_refused_clearly(scenes, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _task(tmp_path, scenes, uri, finetune={"freeze": "all", "cache_features": True},
                 data={"train_transforms": []})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "error: finetune.cache_features: the segmentation task cannot train on cached features" in result.output


def test_task_files_validate_and_voc_fails_clearly_without_voc(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/VOCdevkit here
    for name, fmt in (("segmentation_voc", "voc"), ("segmentation_shapes", "coco")):
        result = CliRunner().invoke(main, ["config", str(REPO / "tasks" / f"{name}.yaml")])
        assert result.exit_code == 0 and f"format: {fmt}" in result.output
    result = CliRunner().invoke(main, ["run", str(REPO / "tasks" / "segmentation_voc.yaml"), f"tracking.uri={uri}"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data/VOCdevkit/VOC2012' does not exist" in errors[0]
    assert "VOCtrainval_11-May-2012.tar" in errors[0]
