"""Tracking against a real MLflow sqlite store and real artifacts in tmp_path; no network."""
import http.server
import logging
import math
import os
import threading
import time
from pathlib import Path

import matplotlib
import mlflow
import pandas as pd
import pytest
import torch
from loopback import free_port
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tracking import Tracker, check_reachable, flatten, resolve_uri

matplotlib.use("Agg")  # no display on test machines
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow puts artifacts under ./mlruns of the working directory, and reads MLFLOW_TRACKING_URI
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def start(uri: str, **kwargs) -> Tracker:
    args = dict(experiment="quickstart", run_name="resnet18", params={"train.lr": "0.001"}, tags={"task": "cls"})
    return Tracker.start(uri, **{**args, **kwargs})


# --- flatten / resolve_uri / check_reachable -------------------------------------------------------------------------


def test_flatten_nested_dicts_and_lists():
    cfg = {"train": {"lr": 0.001, "epochs": 3, "amp": True}, "finetune": {"freeze": ["stem", "layer1"]},
           "model": {"backbone": {"name": "resnet50", "weights": None}}, "augment": {}, "seed": 0}
    assert flatten(cfg) == {
        "train.lr": "0.001", "train.epochs": "3", "train.amp": "True", "finetune.freeze": "['stem', 'layer1']",
        "model.backbone.name": "resnet50", "model.backbone.weights": "None", "augment": "{}", "seed": "0"}


def test_flatten_shortens_values_over_mlflow_limit():
    flat = flatten({"data": {"classes": list(range(5000))}, "ok": "x" * MAX_PARAM_VAL_LENGTH})
    assert len(flat["data.classes"]) == MAX_PARAM_VAL_LENGTH
    assert flat["data.classes"].startswith("[0, 1, 2") and flat["data.classes"].endswith(tracking.TRUNCATION_MARK)
    assert flat["ok"] == "x" * MAX_PARAM_VAL_LENGTH  # exactly at the limit: untouched


def test_resolve_uri_precedence(monkeypatch):
    assert resolve_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri(None) == "http://env:5000"
    assert resolve_uri("sqlite:///cfg.db") == "sqlite:///cfg.db"


def test_check_reachable_dead_server_fails_fast_naming_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(UserError, match="not reachable") as e:
        check_reachable(uri)
    assert time.monotonic() - t0 < 10
    assert uri in str(e.value) and "mlflow server" in str(e.value)


def test_check_reachable_any_http_answer_counts():
    # a server that answers /health with an error status (501 here) is up: MLflow will say what is wrong with it
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.server_close()


def test_check_reachable_sqlite_creates_folder_or_says_why(tmp_path):
    check_reachable(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="cannot create folder"):
        check_reachable(f"sqlite:///{tmp_path}/afile/mlflow.db")


# --- run lifecycle ---------------------------------------------------------------------------------------------------


def test_run_logs_params_tags_metrics_and_artifacts(uri, tmp_path):
    params = flatten({"train": {"lr": 0.001}, "data": {"classes": [f"class_{i}" for i in range(1000)]}})
    tracker = start(uri, params=params, tags={"task": "classification", "backbone": "resnet18"})
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "val/top1": 0.1 * step}, step=step)
    tracker.log_metrics({"val/nan": float("nan")}, step=3)
    tracker.set_tags({"num_params": "11M"})
    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.001\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.log_text("0.93\n", "report/summary.txt")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tracker.log_figure(fig, "curves.png")
    plt.close(fig)
    tracker.finish()

    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet18"
    assert run.info.experiment_id == tracker.experiment_id == client.get_experiment_by_name("quickstart").experiment_id
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["data.classes"].endswith(tracking.TRUNCATION_MARK)
    assert run.data.tags["task"] == "classification" and run.data.tags["num_params"] == "11M"
    history = client.get_metric_history(tracker.run_id, "val/top1")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert math.isnan(client.get_metric_history(tracker.run_id, "val/nan")[0].value)
    assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"config.yaml", "report", "curves.png"}
    assert Path(client.download_artifacts(tracker.run_id, "report/summary.txt", str(tmp_path))).read_text() == "0.93\n"


def test_resume_keeps_logged_params_and_warns(uri, caplog):
    first = start(uri, params={"train.lr": "0.001", "train.epochs": "3"})
    first.finish("KILLED")

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        resumed = start(uri, run_id=first.run_id,
                        params={"train.lr": "0.001", "train.epochs": "12", "train.resume": "True"})
    client = mlflow.MlflowClient(uri)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.finish()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "train.epochs": "3", "train.resume": "True"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking.run"]
    assert len(warnings) == 1 and "train.epochs" in warnings[0] and "'12'" in warnings[0]


def test_experiments_open_in_the_ui_s_model_training_mode(uri):
    """Experiments record their type as model training (`mlflow.experimentKind`); MLflow 3.17's UI takes its mode from
    the link (`workflowType`, tracking/ui.py), other UI builds from this tag."""
    client = mlflow.MlflowClient(uri)
    start(uri).finish()
    assert client.get_experiment_by_name("quickstart").tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-earlier")  # an experiment that predates the tag gets it on its next run
    Tracker.start(uri, "made-earlier", run_name="r", params={}, tags={}).finish()
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_resume_unknown_run_is_a_user_error(uri):
    with pytest.raises(UserError, match="0123abcd"):
        start(uri, run_id="0123abcd")


def test_deleted_experiment_is_a_user_error(uri):
    start(uri).finish()
    client = mlflow.MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("quickstart").experiment_id)
    with pytest.raises(UserError, match="mlflow experiments restore"):
        start(uri)


def test_parent_run_id_nests_the_run(uri):
    parent = start(uri, run_name="sweep")
    child = start(uri, parent_run_id=parent.run_id)
    assert mlflow.MlflowClient(uri).get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_finish_failed_sets_error_tag(uri):
    tracker = start(uri)
    tracker.finish("FAILED", error="RuntimeError: " + "x" * 10_000)
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("RuntimeError: xxx") and len(run.data.tags["error"]) <= 8000
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")


@pytest.mark.parametrize("exc, status", [(None, "FINISHED"), (ValueError("bad lr"), "FAILED"),
                                         (KeyboardInterrupt(), "KILLED")])
def test_context_manager_sets_status(uri, exc, status):
    tracker = start(uri)
    if exc is None:
        with tracker:
            pass
    else:
        with pytest.raises(type(exc)), tracker:
            raise exc
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == status
    assert ("error" in run.data.tags) == (exc is not None)
    if isinstance(exc, ValueError):
        assert run.data.tags["error"] == "ValueError: bad lr"


def test_context_manager_keeps_an_explicit_finish(uri):
    with start(uri) as tracker:
        tracker.finish("KILLED")
    assert mlflow.MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


# --- model -----------------------------------------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


# A pyfunc as "models from code", like pipeline/use/served_model.py: its weights are an artifact, read back on load.
TINY_PYFUNC = """
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class Tiny(PythonModel):
    def load_context(self, context):
        self.module = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        self.module.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.module.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[list[float]]:
        x = torch.tensor(model_input["x"].to_numpy(), dtype=torch.float32)[:, None]
        with torch.no_grad():
            return self.module(x).tolist()


set_model(Tiny())
"""


def test_log_model_links_a_loadable_logged_model_to_the_run(uri, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # the process-wide URI must not be used
    model = tiny_model()
    (tmp_path / "tiny_pyfunc.py").write_text(TINY_PYFUNC)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    pyfunc = tracking.Pyfunc(tmp_path / "tiny_pyfunc.py", {"weights": str(tmp_path / "weights.pt")},
                             pd.DataFrame({"x": [0.5, 2.0]}), ModelSignature(Schema([ColSpec("double", "x")])),
                             [f"torch=={torch.__version__.split('+')[0]}"])
    tracker = start(uri)
    tracker.log_metrics({"val/top1": 0.5}, step=2)
    model_uri = tracker.log_model(pyfunc, name="model", step=2)
    tracker.finish()

    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"  # the process state is put back
    client = mlflow.MlflowClient(uri)
    (logged,) = client.search_logged_models([tracker.experiment_id])
    assert model_uri == f"models:/{logged.model_id}"
    assert logged.source_run_id == tracker.run_id and logged.name == "model" and logged.status == "READY"
    assert [(m.key, m.value) for m in logged.metrics] == [("val/top1", 0.5)]
    assert client.get_run(tracker.run_id).outputs.model_outputs[0].model_id == logged.model_id
    assert len(client.get_metric_history(tracker.run_id, "val/top1")) == 1  # linking does not duplicate history

    loaded = tracking.load_model(uri, model_uri)  # the pyfunc's torch module
    batch = torch.linspace(-1, 1, 5)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))
