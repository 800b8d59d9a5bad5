"""Exact resume: a run killed with SIGKILL after a checkpoint resumes to the metrics of an uninterrupted run, in the
same MLflow run, with every epoch logged once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.data.sampling import EpochSampler, SeededDataset
from pipeline.train import checkpoint, runner

EPOCHS = 4
REPO = Path(__file__).resolve().parent.parent


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.e2e
def test_killed_run_resumes_exactly(task_file, uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # random augmentation and shuffling both matter for exactness: crop + flip, like the quickstart
    path = task_file(train={"epochs": EPOCHS, "lr": 2e-3}, data={"train_transforms": [
        {"name": "PadIfNeeded", "min_height": 36, "min_width": 36, "border_mode": 4},
        {"name": "RandomCrop", "height": 32, "width": 32}, {"name": "HorizontalFlip", "p": 0.5}]})
    straight = runner.run(path, ("train.output_dir=" + str(tmp_path / "straight"),))

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), f"train.output_dir={out}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / checkpoint.LAST).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = checkpoint.load(out / checkpoint.LAST)["fit"]["epoch"]
    assert killed_after < EPOCHS, "the run finished before it could be killed"

    resumed = runner.run(path, (f"train.output_dir={out}",), resume=True)
    client = MlflowClient(uri)
    assert resumed.run_id == checkpoint.load(out / checkpoint.LAST)["run_id"]
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert resumed.best == pytest.approx(straight.best, abs=0.01)
    for key in ("val/top1", "val/loss", "train/loss_epoch"):
        a, b = _history(client, straight.run_id, key), _history(client, resumed.run_id, key)
        assert [s for s, _ in b] == list(range(1, EPOCHS + 1)), f"{key}: an epoch is missing or logged twice"
        assert [v for _, v in b] == pytest.approx([v for _, v in a], abs=1e-4), key
    steps = [s for s, _ in _history(client, resumed.run_id, "train/loss")]
    assert steps == sorted(set(steps)), "per-step losses of the replayed epoch were logged twice"


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    a.set_epoch(2)
    b.set_epoch(1)
    list(b)  # iterating one epoch must not change the next
    b.set_epoch(2)
    assert list(a) == list(b)
    a.set_epoch(3)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert sorted(i for i, _ in a) == list(range(10))


def test_epoch_sampler_shards_ranks_disjointly_with_equal_lengths():
    shards = [list(EpochSampler(10, seed=0, rank=r, world=3, with_seeds=False)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))  # 2 of the 12 slots repeat an index, as DistributedSampler pads


def test_seeded_dataset_replays_an_augmentation(shapes):
    from pipeline.data.transforms import build_transforms
    from pipeline.tasks.classification.data import build_datasets

    tf = build_transforms([{"name": "RandomResizedCrop", "size": [32, 32], "scale": [0.2, 1.0]}], field="t",
                          mean=(0, 0, 0), std=(1, 1, 1), seed=0)
    train, _, _ = build_datasets(shapes, "imagefolder", val_fraction=0.0, seed=0, train_transform=tf,
                                 val_transform=tf, skip_bad_images=False, download=False)
    ds = SeededDataset(train)
    first = ds[(5, 123)][0]
    ds[(6, 7)]
    assert (ds[(5, 123)][0] == first).all()
    assert not (ds[(5, 124)][0] == first).all()
    assert ds.dataset is train and len(ds) == len(train)
