"""`pipeline sweep` and `pipeline compare` end to end: tiny backbones at 32 px, one epoch, a real sqlite store."""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.study import sweep

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_task(folder: Path, shapes: Path, uri: str, name: str = "tiny") -> Path:
    """A one-epoch classification task on the shared shapes set, with the repo's configs/ beside it."""
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    if not (folder / "configs").exists():
        shutil.copytree(REPO / "configs", folder / "configs")
    cfg = {"task": "classification", "seed": 0,
           "data": {"root": str(shapes), "image_size": 32, "batch_size": 64, "num_workers": 0,
                    "val_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
           "model": {"backbone": {"name": "resnet18", "weights": "none"}},
           "finetune": {"freeze": "all"},  # the head alone trains: the backbone needs no backward pass
           "train": {"epochs": 1, "lr": 1e-3},
           "tracking": {"uri": uri, "log_model": False}}
    path = folder / "tasks" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept(module_dir: Path, empty_store: Path, shapes: Path):
    """The issue's sweep: resnet18 and resnet34 under one parent, run once for the tests of this module."""
    folder = module_dir
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    task = write_task(folder, shapes, uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # MLflow artifacts and outputs/ land in the temp folder
        result = cli("sweep", task, "model.backbone.name=resnet18,resnet34", "train.epochs=1")
        assert result.exit_code == 0, result.output
        yield {"uri": uri, "folder": folder, "output": result.output, "client": MlflowClient(uri)}


def runs_of(client: MlflowClient, experiment: str = "tiny"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_sweep_makes_one_parent_and_a_tagged_child_per_value(swept):
    client = swept["client"]
    runs = runs_of(client)
    parents = [r for r in runs if r.data.tags.get(sweep.ROLE_TAG) == "parent"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["depth"]))
    assert [r.data.tags["depth"] for r in children] == ["18", "34"]
    for child, name in zip(children, ("resnet18", "resnet34")):
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["model.backbone.name"] == name and tags["backbone"] == name  # the swept value, and the runner's
        assert int(tags["num_params"]) > 10_000_000 and float(tags["gflops"]) > 0
        assert params["depth"] == tags["depth"] and params["model.backbone.name"] == name
        assert params["train.epochs"] == "1"  # the fixed override reached every child
        assert set(child.data.metrics) >= {"val/top1", "best/top1", "train/throughput"}  # same keys for all depths
        # numbers MLflow's charts can plot against each other, and what the child trained on
        assert child.data.metrics["model/depth"] == int(tags["depth"])
        assert child.data.metrics["model/num_params"] == int(tags["num_params"])
        assert child.data.metrics["model/gflops"] == pytest.approx(float(tags["gflops"]))
        assert {i.dataset.name.rsplit(" ", 1)[-1] for i in child.inputs.dataset_inputs} == {"train", "val"}
    # deeper costs more, on the model itself at the task's 32 px
    assert float(children[1].data.tags["gflops"]) > float(children[0].data.tags["gflops"])
    # a finished child keeps its config, report and log; its best weights live once, in its MLflow run
    dirs = {swept["folder"] / Path(r.data.params["train.output_dir"]) for r in children}
    assert len(dirs) == 2 and all((d / "config.yaml").is_file() and (d / "run.log").is_file() for d in dirs)
    assert not [p for d in dirs for p in d.rglob("*.pt")]
    assert all("checkpoints/best.pt" in [a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")]
               for r in children)
    assert "resnet18" in swept["output"] and "FINISHED" in swept["output"].split("sweep ")[-1]
    # the sweep's last line links its children's charts in MLflow's UI: a view of this sweep alone
    experiment_id, key = parent.info.experiment_id, f"pipeline-sweep-{parent.info.run_id[:8]}"
    assert swept["output"].rstrip().endswith(
        f"MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}&compareRunsMode=CHART (serve it with: pipeline ui --uri {swept['uri']})")
    view = json.loads(client.get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    assert view["compareRunCharts"][0]["yaxis"]["key"] == "best/top1"  # the primary metric's chart first
    assert "compare:" not in swept["output"]


def test_compare_prints_both_depths_and_logs_plots_to_the_parent(swept, tmp_path: Path):
    result = cli("compare", "tiny", "--uri", swept["uri"], "--out", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("resnet") and ": " not in line]
    assert [r.split()[:2] for r in rows] == [["resnet18", "18"], ["resnet34", "34"]]  # sorted by depth
    for name in ("metric_vs_depth.png", "metric_vs_gflops.png", "curves.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, name
    assert len((tmp_path / "plots" / "runs.csv").read_text().splitlines()) == 3
    client = swept["client"]
    parent = next(r for r in runs_of(client) if r.data.tags.get(sweep.ROLE_TAG) == "parent")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/metric_vs_depth.png", "compare/metric_vs_gflops.png", "compare/curves.png"} <= logged


def test_a_failed_child_does_not_stop_the_sweep_and_resume_reruns_only_it(said, tmp_path, empty_store, shapes,
                                                                          monkeypatch):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    task = write_task(tmp_path, shapes, uri)
    monkeypatch.chdir(tmp_path)
    args = ("finetune.freeze=[layer9],all",)  # the first child names a stage resnet18 does not have
    with pytest.raises(UserError, match="1 of 2 sweep runs failed"):
        sweep.run(task, args)
    client = MlflowClient(uri)
    children = {r.data.tags["finetune.freeze"]: r for r in runs_of(client) if "finetune.freeze" in r.data.tags}
    assert children["[layer9]"].info.status == "FAILED" and "layer9" in children["[layer9]"].data.tags["error"]
    assert children["all"].info.status == "FINISHED"  # the sweep went on after the failure
    parent = next(r for r in runs_of(client) if r.data.tags.get(sweep.ROLE_TAG) == "parent")
    assert parent.info.status == "FAILED"
    with pytest.raises(UserError):  # the bad child fails again; the finished one is not rerun
        sweep.run(task, args, resume=True)
    runs = runs_of(client)
    assert sum(r.data.tags.get(sweep.ROLE_TAG) == "parent" for r in runs) == 1  # the same parent, reopened
    assert sorted(r.data.tags.get("finetune.freeze", "") for r in runs) == ["", "[layer9]", "[layer9]", "all"]
    assert any("skipped" in line and "finetune.freeze=all" in line for line in said)


@pytest.mark.parametrize("args, expected", [
    (("model.backbone.nme=resnet18,resnet34",), "unknown key 'model.backbone.nme'"),
    (("model.backbone.name=resnet18,",), "has an empty value"),
    (("model.backbone.name=resnet18,resnet1800",), "'resnet1800' is not a timm model"),
    (("train.epochs=1",), "nothing to sweep"),
    (("train.lr=0.1,0.2", "train.lr=0.3,0.4"), "given twice"),
    (("tracking.experiment=a,b",), "cannot be swept"),
])
def test_bad_sweep_arguments_are_one_line_errors_before_any_run(tmp_path, empty_store, shapes, args, expected):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli("sweep", write_task(tmp_path, shapes, uri), *args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert MlflowClient(uri).get_experiment_by_name("tiny") is None  # nothing started


def test_values_split_on_top_level_commas_only():
    assert sweep.split_values("resnet18,resnet50") == ["resnet18", "resnet50"]
    assert sweep.split_values("[stem,layer1],[stem]") == ["[stem,layer1]", "[stem]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    assert sweep.split_values("{layer4: 2, layer3: 4}") == ["{layer4: 2, layer3: 4}"]
    fixed, swept = sweep.parse_args(("train.epochs=2", "finetune.freeze=[stem,layer1]", "train.lr=1e-3,1e-2"))
    assert fixed == ["train.epochs=2", "finetune.freeze=[stem,layer1]"] and swept == {"train.lr": ["1e-3", "1e-2"]}


def test_child_folders_are_named_after_the_swept_values():
    assert sweep.child_dir_name({"model.backbone.name": "resnet18", "train.lr": "0.01"}) == "name=resnet18_lr=0.01"
    assert sweep.child_dir_name({"finetune.freeze": "[stem, layer1]"}) == "freeze=-stem-layer1-"
