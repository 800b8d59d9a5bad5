"""Warnings that save a run: settings that are valid but waste it, each one `warning:` line before anything trains."""
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.config.sections import TrainConfig
from pipeline.train import checks

QUICKSTART = Path(__file__).resolve().parent.parent / "tasks" / "quickstart.yaml"


def test_a_sane_config_says_nothing():
    quickstart = config.load(QUICKSTART)
    assert checks.warnings(quickstart.train, quickstart.data.batch_size, train_size=1200, val_size=300,
                           num_classes=6) == []


@pytest.mark.parametrize("warmup, epochs, reached", [(3, 2, "peaks at 67% of it"),
                                                    (2, 2, "reaches it only at the last step")])
def test_warmup_as_long_as_the_run(warmup: float, epochs: int, reached: str):
    (line,) = checks.warnings(TrainConfig(warmup_epochs=warmup, epochs=epochs), 10, train_size=100, val_size=50)
    assert line.startswith(f"train.warmup_epochs={warmup} >= train.epochs={epochs}: ")
    assert reached in line and "\n" not in line


def test_a_schedule_that_never_reaches_its_peak():
    t = TrainConfig(schedule="step", step_milestones=[0, 5], step_gamma=0.1, epochs=10)
    (line,) = checks.warnings(t, 10, train_size=100, val_size=50)
    assert line.startswith("the learning rate never reaches train.lr=0.001: train.schedule=step peaks at 10%")
    assert checks.warnings(t.model_copy(update={"step_milestones": [5]}), 10, 100, 50) == []


def test_data_sizes():
    t = TrainConfig()
    (val,) = checks.warnings(t, 8, train_size=100, val_size=4, num_classes=6)
    assert val.startswith("the val set holds 4 images for 6 classes, so at least 2 classes are never "
                          "validated")
    assert checks.warnings(t, 8, train_size=100, val_size=4) == []  # no num_classes: e.g. segmentation, many per image
    (batch,) = checks.warnings(t, 64, train_size=40, val_size=20)
    assert batch.startswith("data.batch_size=64 is larger than the 40 training images: every epoch is one "
                            "batch")
    assert checks.steps_per_epoch(train_size=100, batch_size=32, accum_steps=1) == 3  # full batches (drop_last)
    assert checks.steps_per_epoch(train_size=20, batch_size=32, accum_steps=1) == 1


@pytest.mark.e2e
def test_the_warnings_fire_at_the_start_of_a_run(task_file, shapes: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(shutil.copytree(shapes, tmp_path / "few_val"))
    for i, folder in enumerate(sorted((root / "val").iterdir())):  # 3 val images for 6 classes
        if i < 3:
            for image in sorted(folder.iterdir())[1:]:
                image.unlink()
        else:
            shutil.rmtree(folder)
    path = task_file(data={"root": str(root)}, train={"epochs": 1, "warmup_epochs": 2})
    result = CliRunner().invoke(main, ["run", str(path), "data.batch_size=128"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warnings = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    said = " ".join(lines[i] for i in warnings)
    assert "train.warmup_epochs=2 >= train.epochs=1" in said
    assert "the val set holds 3 images for 6 classes" in said
    assert "data.batch_size=128 is larger than the 60 training images" in said
    training = next(i for i, line in enumerate(lines) if line.startswith("training resnet18"))
    assert max(warnings) < training  # at the start, before anything trains
    # off a terminal: no progress bars, a plain line per epoch
    assert "\r" not in result.output and any(line.startswith("epoch 1/1  loss") for line in lines)
