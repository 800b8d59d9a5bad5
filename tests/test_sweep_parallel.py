"""Sweeps that use more than one device: `--jobs N` on this machine, `--ray ADDRESS` on a Ray instance, into one
tracking store (sqlite here; a team's PostgreSQL-backed `mlflow server` in tests/test_team_store.py)."""
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.cli import main
from pipeline.study import children, jobs, on_ray
from pipeline.tracking import writers

REPO = Path(__file__).resolve().parent.parent


def write_task(folder: Path, shapes: Path, uri: str, name: str = "tiny") -> Path:
    """Two-epoch runs of a frozen resnet on the shared shapes, logging every step: many points per history."""
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    cfg = {"task": "classification", "seed": 0,
           "data": {"root": str(shapes), "image_size": 32, "batch_size": 20, "num_workers": 0,
                    "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
           "model": {"backbone": {"name": "resnet18", "weights": "none"}},
           "finetune": {"freeze": "all"},
           "train": {"epochs": 2, "lr": 1e-3, "log_every": 1},
           "tracking": {"uri": uri, "log_model": False, "system_metrics_every": 0}}
    path = folder / "tasks" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, says", [
    (["--jobs", "0"], "--jobs 0: give the number of children to run at once, 1 or more"),
    (["--jobs", "-2"], "--jobs -2: give the number"),
    (["--jobs", "2", "--ray", "local"], "--jobs and --ray both say how to run the children; give one of them"),
    (["--ray", "nowhere"], "--ray nowhere: give local"),
    (["--ray", f"ray://127.0.0.1:{closed_port()}"], "no Ray client server answers there"),
    (["--ray", "auto"], "workers on other machines cannot write to the local store sqlite:///"),
])
def test_bad_parallel_arguments_are_one_line(args, says, tmp_path: Path, shapes: Path, uri: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = write_task(tmp_path, shapes, uri)
    result = CliRunner().invoke(main, ["sweep", str(task), "model.backbone.name=resnet18,resnet34", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert MlflowClient(uri).search_runs(["0"]) == [] and not (tmp_path / "outputs").exists()  # nothing started


def test_ray_missing_says_how_to_install_it(tmp_path: Path, shapes: Path, uri: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(on_ray, "installed", lambda: False)
    result = CliRunner().invoke(main, ["sweep", str(write_task(tmp_path, shapes, uri)),
                                       "model.backbone.name=resnet18,resnet34", "--ray", "local"])
    assert result.exit_code == 1 and "--ray needs Ray" in result.output and "pip install -e '.[ray]'" in result.output


def test_cpu_slots_are_disjoint_core_sets_and_gpu_slots_go_round_robin():
    assert [s.cores for s in jobs.slots(2, cores=[0, 1])] == [(0,), (1,)]
    assert [s.cores for s in jobs.slots(3, cores=list(range(8)))] == [(0, 1), (2, 3, 4), (5, 6, 7)]
    assert [s.cores for s in jobs.slots(4, cores=[0, 1])] == [(0,), (1,)]  # never more children than cores
    assert [s.env() for s in jobs.slots(2, cores=[4, 5, 6, 7])] == [{"OMP_NUM_THREADS": "2"}] * 2
    assert [s.gpus for s in jobs.slots(5, visible_gpus=["0", "1", "2"])] == [("0",), ("1",), ("2",), ("0",), ("1",)]
    pairs = jobs.slots(2, gpus_per_child=2, visible_gpus=["4", "5", "6", "7"])
    assert [s.env() for s in pairs] == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    assert str(pairs[0]) == "GPU 4,5" and str(jobs.slots(1, cores=[0, 1, 2, 5])[0]) == "cores 0-2,5"


def test_a_child_on_several_gpus_runs_under_torchrun(tmp_path: Path):
    child = children.spec(1, 2, {"model.backbone.name": "resnet50"}, ["train.epochs=3"], tmp_path / "c", False)
    cmd = children.command("tasks/x.yaml", child, "p" * 32, gpus=2)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:8] == ["pipeline", "run"] and cmd[8] == str(Path("tasks/x.yaml").resolve())
    assert "model.backbone.name=resnet50" in cmd and f"train.output_dir={tmp_path / 'c'}" in cmd
    assert cmd[-4:] == ["--parent-run-id", "p" * 32, "--tag", "model.backbone.name=resnet50"]


def test_a_locked_sqlite_store_is_waited_for_not_lost(uri: str, monkeypatch):
    tracker = tracking.Tracker.start(uri, "locks", run_name="r", params={}, tags={})
    monkeypatch.setattr(writers, "LOCKED_WAITS", (0.0, 0.0, 0.0))
    write, refused = tracker._write, []

    def busy_twice(record):
        if len(refused) < 2:
            refused.append(record["op"])
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        write(record)

    monkeypatch.setattr(tracker, "_write", busy_twice)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    assert refused == ["metrics", "metrics"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(tracker.run_id, "train/loss")] == [1.0]


def test_a_dataset_two_children_register_at_once_is_linked_not_lost(uri: str, monkeypatch):
    """The slower of two runs inserting the same dataset is refused as a duplicate: its second try links the row the
    other one wrote. A duplicate anywhere else is a fault of its own and is raised."""
    tracker = tracking.Tracker.start(uri, "datasets", run_name="r", params={}, tags={})
    monkeypatch.setattr(writers, "LOCKED_WAITS", (0.0, 0.0, 0.0))
    write, refused = tracker._write, []

    def raced_once(record):
        if not refused:
            refused.append(record["op"])
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        write(record)

    monkeypatch.setattr(tracker, "_write", raced_once)
    tracker.log_datasets([tracking.DatasetRecord(name="shapes train", digest="abc123", source="/data/shapes",
                                                 context="training", rows=1200)])
    assert refused == ["inputs"]
    inputs = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("shapes train", "abc123")]
    refused.clear()
    with pytest.raises(MlflowException, match="UNIQUE constraint failed"):
        tracker._apply({"op": "metrics", "metrics": {"train/loss": 1.0}, "timestamp": 0, "step": 1})


def _histories(client: MlflowClient, experiment: str) -> dict[tuple, dict[str, int]]:
    """For each child (by its swept values): how many points each of its metric histories holds."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    out = {}
    for r in runs:
        if "model.backbone.name" not in r.data.tags:
            continue  # the parent
        key = (r.data.tags["model.backbone.name"], r.data.tags["train.lr"])
        assert r.info.status == "FINISHED", (key, r.data.tags.get("error"))
        out[key] = {m: len(client.get_metric_history(r.info.run_id, m)) for m in r.data.metrics}
    return out


@pytest.mark.e2e
def test_four_children_at_once_on_one_sqlite_store_lose_no_point(tmp_path: Path, shapes: Path, empty_store: Path,
                                                                  monkeypatch):
    """Four `pipeline run` processes write to one sqlite file at once (two per core); every metric history holds as
    many points as when the same children run one by one."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    task = write_task(tmp_path, shapes, uri)
    args = ["model.backbone.name=resnet18,resnet34", "train.lr=0.001,0.01"]
    one_by_one = CliRunner().invoke(main, ["sweep", str(task), *args, "tracking.experiment=sequential"])
    assert one_by_one.exit_code == 0, one_by_one.output
    four = [jobs.Slot(cores=(0,)), jobs.Slot(cores=(0,)), jobs.Slot(cores=(1,)), jobs.Slot(cores=(1,))]
    monkeypatch.setattr(jobs, "slots", lambda n, gpus_per_child=1: four)  # four at once on the two cores
    at_once = CliRunner().invoke(main, ["sweep", str(task), *args, "tracking.experiment=parallel", "--jobs", "4"])
    assert at_once.exit_code == 0, at_once.output
    client = MlflowClient(uri)
    sequential, parallel = _histories(client, "sequential"), _histories(client, "parallel")
    assert len(parallel) == 4 and parallel == sequential
    assert all(counts["train/loss"] >= 6 for counts in parallel.values())  # a point a step: many writes at once
    # each child trained on its slot's one core: the environment it was forked into
    consoles = [p.read_text() for p in tmp_path.rglob("console.log") if "parallel" in str(p)]
    assert len(consoles) == 4 and all("with 1 threads (OMP_NUM_THREADS=1)" in text for text in consoles)
    # the console: a line as each child starts and ends, then the same summary as a sequential sweep
    lines = at_once.output.splitlines()
    assert sum(" on core " in line and " -> " in line for line in lines) == 4
    assert sum(": FINISHED in " in line for line in lines) == 4
    summary = next(i for i, line in enumerate(lines) if line.startswith("sweep ") and line.endswith(":"))
    assert summary > max(i for i, line in enumerate(lines) if ": FINISHED in " in line)


@pytest.mark.e2e
def test_a_failing_child_is_kept_and_the_others_finish(tmp_path: Path, shapes: Path, uri: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = write_task(tmp_path, shapes, uri)
    result = CliRunner().invoke(main, ["sweep", str(task), "finetune.freeze=[layer9],all", "train.epochs=1",
                                       "--jobs", "2"])
    assert result.exit_code == 1
    assert "[1/2] finetune.freeze=[layer9]: FAILED in" in result.output
    assert "finetune.freeze: unknown stage 'layer9'" in result.output  # the child's own error line, from its console
    assert "[2/2] finetune.freeze=all: FINISHED in" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 2 sweep runs failed" in errors[0]
    client = MlflowClient(uri)
    statuses = {r.data.tags["finetune.freeze"]: r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id]) if "finetune.freeze" in r.data.tags}
    assert statuses == {"[layer9]": "FAILED", "all": "FINISHED"}


def test_a_child_whose_worker_died_is_marked_failed_with_the_reason(uri: str, tmp_path: Path):
    """A child process killed with its Ray worker (a node lost, an out-of-memory kill) cannot end its own run: the
    sweep ends it FAILED, with the reason as the run's error tag, and says so in its table."""
    from pipeline.tasks.metric import Metric

    parent = tracking.Tracker.start(uri, "died", run_name="sweep", params={}, tags={"pipeline.sweep": "parent"})
    values = {"model.backbone.name": "resnet50"}
    orphan = tracking.Tracker.start(uri, "died", run_name="resnet50", params={}, tags=values,
                                    parent_run_id=parent.run_id)  # RUNNING, as its dead process left it
    child = children.spec(1, 1, values, [], tmp_path / "c", False)
    found = children.collect(uri, "died", parent.run_id, child, -1, Metric("val/top1"),
                             reason="its Ray worker died: The actor died unexpectedly")
    assert (found.status, found.run_id) == ("FAILED", orphan.run_id) and "worker died" in found.error
    run = MlflowClient(uri).get_run(orphan.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "its Ray worker died: The actor died unexpectedly"
