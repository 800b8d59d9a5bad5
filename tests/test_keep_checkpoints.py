"""train.keep_checkpoints: a finished run keeps what it says, best.pt never holds optimizer state, and the default
keeps what --resume needs."""
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint, runner

pytestmark = pytest.mark.e2e

KEPT = {"best": {"best.pt"}, "last": {"best.pt", "last.pt"}, "all": {"best.pt", "last.pt", "last.prev.pt"}}


@pytest.mark.parametrize("keep", KEPT)
def test_a_finished_run_keeps_what_keep_checkpoints_says(keep: str, task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.run(task_file(train={"epochs": 2, "keep_checkpoints": keep}))
    assert {p.name for p in result.output_dir.glob("*.pt")} == KEPT[keep]
    best = checkpoint.load(result.output_dir / checkpoint.BEST)
    assert "optimizer" not in best and "model" in best  # weights and fit state: what predict and export read
    if keep != "best":
        assert checkpoint.load(result.output_dir / checkpoint.LAST)["optimizer"]["state"]  # what --resume needs


def test_the_default_keeps_no_previous_checkpoint_and_resumes(said, task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 3})
    out = tmp_path / "out"
    out.mkdir()
    # a last.prev.pt of an earlier run: a damaged last.pt must never fall back to another run's state
    checkpoint.save({"fit": {"epoch": 9}}, out / checkpoint.PREVIOUS)
    first = runner.run(path, ("train.epochs=2",))
    assert {p.name for p in first.output_dir.glob("*.pt")} == {"best.pt", "last.pt"}
    resumed = runner.run(path, resume=True)
    assert resumed.run_id == first.run_id and any("after epoch 2" in line for line in said)
    assert checkpoint.load(out / checkpoint.LAST)["fit"]["epoch"] == 3


def test_save_last_keeps_the_previous_one_only_when_asked(tmp_path: Path):
    for epoch in (1, 2):
        checkpoint.save_last({"epoch": epoch, "w": torch.zeros(3)}, tmp_path, keep="all")
    assert checkpoint.load(tmp_path / checkpoint.PREVIOUS)["epoch"] == 1
    checkpoint.save_last({"epoch": 3}, tmp_path, keep="last")
    assert not (tmp_path / checkpoint.PREVIOUS).exists() and checkpoint.load(tmp_path / checkpoint.LAST)["epoch"] == 3
    checkpoint.prune(tmp_path, "best")
    assert not (tmp_path / checkpoint.LAST).exists()
    with pytest.raises(ValueError, match="one of none, best, last, all"):
        checkpoint.prune(tmp_path, "some")
