"""`pipeline run` end to end on the synthetic shapes data, read back from a real MLflow sqlite store."""
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.cli import main
from pipeline.train import checkpoint, runner

pytestmark = pytest.mark.e2e


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_trains_and_logs_everything(trained_runs):
    """The session's classification run (tests/shared_runs.py): 3 epochs at lr 0.002 with the stem frozen."""
    result = trained_runs("classification")
    uri = result.uri
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.info.run_name.startswith("resnet18-")
    params = run.data.params
    assert params["model.backbone.name"] == "resnet18" and params["train.lr"] == "0.002"
    assert params["finetune.freeze"] == "['stem']"
    tags = run.data.tags
    assert tags["task"] == "classification" and tags["backbone"] == "resnet18" and tags["depth"] == "18"
    assert tags["weights"] == "none" and tags["num_classes"] == "6" and tags["device"] == "cpu"
    assert tags["frozen_stages"] == "stem" and int(tags["trainable_params"]) < int(tags["num_params"])
    assert tags["precision"] in ("bf16", "fp32")
    # model training in MLflow's UI, and the model's cost as numbers a chart can put on an axis
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    metrics = run.data.metrics
    assert metrics["model/depth"] == 18 and metrics["model/num_params"] == int(tags["num_params"])
    assert metrics["model/gflops"] == pytest.approx(float(tags["gflops"])) and metrics["model/gflops"] > 0
    epoch_times = [m.value for m in client.get_metric_history(result.run_id, "epoch_time")]
    assert metrics["train/wall_time_s"] == pytest.approx(sum(epoch_times))
    # the view the printed link opens sorts by depth and shows the best score first
    view = json.loads(experiment.tags["mlflow.sharedViewState.pipeline"])
    assert view["orderByKey"] == "metrics.`model/depth`" and view["selectedColumns"][0] == "metrics.`best/top1`"
    # what it trained and validated on, as MLflow dataset inputs with a digest of the files
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    shapes = Path(params["data.root"])
    assert inputs["training"].name == f"{shapes.parent.name}/{shapes.name} train"
    assert inputs["validation"].name == f"{shapes.parent.name}/{shapes.name} val"
    assert json.loads(inputs["training"].source) == {"uri": str(shapes.resolve())}
    assert json.loads(inputs["validation"].profile) == {"num_rows": 24}
    assert len(inputs["training"].digest) == 8 and inputs["training"].digest != inputs["validation"].digest
    # per-epoch metrics at steps 1..3, per-step loss and one lr per group
    top1 = client.get_metric_history(result.run_id, "val/top1")
    assert [m.step for m in top1] == [1, 2, 3]
    for key in ("val/top5", "val/loss", "val/acc/circle", "val/mean_class_acc", "train/throughput", "epoch_time",
                "best/top1"):
        assert client.get_metric_history(result.run_id, key), key
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert len(losses) >= 3
    assert losses[-1].value < losses[0].value  # it learns
    for group in ("layer1", "layer4", "head"):
        assert client.get_metric_history(result.run_id, f"lr/{group}")
    assert not client.get_metric_history(result.run_id, "lr/stem")  # frozen: no group
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "param_groups.txt", "report"} <= artifacts
    assert "checkpoints" not in artifacts  # the logged model holds best.pt: one copy of the weights per run
    assert {a.path for a in client.list_artifacts(result.run_id, "report")} == \
           {"report/confusion_matrix.png", "report/per_class_accuracy.csv"}
    # the logged model is linked to the run and predicts like the best checkpoint
    with tracking.process_tracking_uri(uri):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [result.run_id]
    saved = yaml.safe_load((result.checkpoint.parent / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3
    best = checkpoint.load(result.checkpoint)
    assert best["fit"]["best"] == pytest.approx(result.best)
    assert best["info"]["classes"] == ["circle", "cross", "hexagon", "square", "star", "triangle"]


def test_resume_continues_the_same_run(task_file, uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 3})
    first = runner.run(path, ("train.epochs=2",))
    ckpt = checkpoint.load(first.output_dir / checkpoint.LAST)
    assert ckpt["fit"]["epoch"] == 2 and ckpt["run_id"] == first.run_id
    # the run was interrupted before epoch 3: resume finishes it in the same MLflow run
    result = run_cli("run", str(path), "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "after epoch 2" in result.output
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    # the link that opens the experiment's runs, as the view that compares them (served by `pipeline ui --uri`)
    assert (f"MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey=pipeline&compareRunsMode=CHART (serve it with: pipeline ui --uri {uri})") \
        in result.output
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == first.run_id and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.run_id, "val/top1")] == [1, 2, 3]
    assert checkpoint.load(first.output_dir / checkpoint.LAST)["fit"]["epoch"] == 3
    assert len(runs[0].inputs.dataset_inputs) == 2  # logged again on resuming: the same datasets, not new ones


def test_seeded_cpu_runs_repeat(task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1, "precision": "fp32"})
    a = runner.run(path, ("train.output_dir=" + str(tmp_path / "a"),))
    b = runner.run(path, ("train.output_dir=" + str(tmp_path / "b"),))
    wa = checkpoint.load(a.output_dir / checkpoint.LAST)["model"]
    wb = checkpoint.load(b.output_dir / checkpoint.LAST)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_weights_file_that_is_not_a_state_dict(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"hello": "world"}, tmp_path / "bad.pth")
    result = CliRunner().invoke(main, ["run", str(task_file()), f"model.backbone.weights={tmp_path / 'bad.pth'}"])
    assert result.exit_code == 1 and "holds no state_dict" in result.output


def test_debug_flag_shows_the_traceback(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--debug", "run", str(task_file()), "data.root=/nonexistent"])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_resume_survives_a_truncated_last_checkpoint(said, task_file, uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 3, "keep_checkpoints": "all"})  # all: last.prev.pt too
    first = runner.run(path, ("train.epochs=2",))
    last = first.output_dir / checkpoint.LAST
    last.write_bytes(last.read_bytes()[:1000])
    result = runner.run(path, resume=True)
    assert result.run_id == first.run_id
    assert any("after epoch 1" in line for line in said)  # epoch 2 is trained again from the previous checkpoint
    assert checkpoint.load(last)["fit"]["epoch"] == 3
    assert MlflowClient(uri).get_run(first.run_id).info.status == "FINISHED"


def test_out_of_memory_says_what_to_do_and_marks_the_run_failed(task_file, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pipeline.train import engine

    real = engine.train_one_epoch
    calls = []

    def second_epoch_oom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 123456789 bytes.")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", second_epoch_oom)
    path = task_file()
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "error: out of memory; lower data.batch_size" in result.output and "Traceback" not in result.output
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert run.info.status == "FAILED" and "not enough memory" in run.data.tags["error"]
    assert checkpoint.load(tmp_path / "out" / checkpoint.LAST)["fit"]["epoch"] == 1  # epoch 1 is kept


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_compile_and_small_conv_are_wired_into_the_run(compile_, task_file, uri: str, tmp_path: Path, monkeypatch):
    """train.compile compiles the model in place (same state_dict keys in checkpoints, logged model loads); on CPU
    an eager model trains with small_conv's convolutions, a compiled one with plain ones; both are logged plain."""
    monkeypatch.chdir(tmp_path)
    compiled, seen = [], []
    original_compile = torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):  # the real inductor compile takes a minute on 2 cores
        compiled.append(type(self).__name__)
        return original_compile(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    original_fit = runner.engine.fit

    def fit(f, state):
        seen.append({type(m).__name__ for m in f.model.modules()})
        return original_fit(f, state)

    monkeypatch.setattr(runner.engine, "fit", fit)
    path = task_file(train={"epochs": 1, "compile": compile_}, tracking={"uri": uri, "log_model": True})
    result = runner.run(path)
    assert compiled == (["Classifier"] if compile_ else [])
    (trained,) = seen
    if compile_:
        assert "Conv2d" in trained and "SmallMapConv2d" not in trained
    else:
        assert "SmallMapConv2d" in trained and "Conv2d" not in trained
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.compile"] == str(compile_)
    state = checkpoint.load(result.output_dir / checkpoint.BEST)["model"]
    assert not any(k.startswith("_orig_mod") for k in state)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [result.run_id]
    logged = {type(m).__name__ for m in tracking.load_model(uri, models[0].model_uri).modules()}
    assert "Conv2d" in logged and "SmallMapConv2d" not in logged


def test_mlflow_s_own_info_lines_stay_in_the_run_s_log(task_file, tmp_path: Path, monkeypatch):
    """A new store: MLflow creates its tables and says so at INFO, as it validates a logged model's example; the
    console keeps to the run's own lines, and run.log beside the checkpoints keeps both."""
    monkeypatch.chdir(tmp_path)
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    path = task_file(train={"epochs": 1}, tracking={"uri": fresh, "log_model": True, "system_metrics_every": 0})
    result = run_cli("run", str(path))
    assert result.exit_code == 0, result.output
    assert "Creating initial MLflow database tables" not in result.output
    assert "Validating input example" not in result.output and "INFO mlflow" not in result.output
    log = (tmp_path / "out" / "run.log").read_text()
    assert "mlflow.store.db.utils: Creating initial MLflow database tables" in log
    assert "mlflow.pyfunc: Validating input example" in log
    assert "pipeline.train.engine: epoch 1/1  loss" in log and "done in" in log  # and every line of the console
    # the best weights are in the store once: the logged model holds them, no separate checkpoint artifact
    client = MlflowClient(fresh)
    run_id = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0].info.run_id
    assert "checkpoints" not in [a.path for a in client.list_artifacts(run_id)]
