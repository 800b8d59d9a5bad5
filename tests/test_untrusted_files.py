"""A pickle payload planted in each file type the pipeline loads never runs: the load fails with one line instead."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.train import checkpoint


class Payload:
    """Unpickling this runs `touch marker`: the classic pickle exploit."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_weights(tmp_path, marker, task_file):
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "w.pth")
    return ["run", str(task_file()), f"model.backbone.weights={tmp_path / 'w.pth'}"]


def _plant_checkpoint(tmp_path, marker, task_file):
    path = task_file()
    out = tmp_path / "out"  # the task file's train.output_dir
    out.mkdir()
    torch.save({"model": {}, "fit": {"epoch": 1}, "run_id": Payload(marker)}, out / checkpoint.LAST)
    return ["run", str(path), "--resume"]


def _plant_task_yaml(tmp_path, marker, task_file):
    path = task_file()
    path.write_text(path.read_text() + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    return ["run", str(path)]


def _plant_override(tmp_path, marker, task_file):
    return ["run", str(task_file()), f"data.root=!!python/object/apply:os.system ['touch {marker}']"]


def _plant_cifar(tmp_path, marker, task_file):
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    good = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(good))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"], b"x": Payload(marker)}))
    return ["run", str(task_file()), f"data.root={tmp_path / 'cifar'}", "data.format=cifar10"]


@pytest.mark.parametrize("plant, says", [
    (_plant_weights, "asks to run posix.system, refused"),
    (_plant_checkpoint, "asks to run posix.system, refused"),
    (_plant_task_yaml, "broken YAML"),
    (_plant_override, "not valid YAML"),
    (_plant_cifar, "asks to run posix.system, which is refused"),
], ids=lambda x: x.__name__.removeprefix("_plant_") if callable(x) else "")
def test_payload_never_runs(plant, says, task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    result = CliRunner().invoke(main, plant(tmp_path, marker, task_file))
    assert result.exit_code == 1, result.output
    assert not marker.exists(), "the payload ran"
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert says in errors[0]
