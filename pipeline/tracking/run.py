"""One MLflow run: start or resume, params, tags, metrics, artifacts, the end status, and an outbox that keeps
records while the tracking server is unreachable (pipeline/tracking/sync.py sends them later).

Everything goes through an explicit `MlflowClient(uri)`, never the fluent `mlflow.start_run()` state, so several runs
and stores can live in one process (sweeps, tests).
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from pipeline.errors import UserError
from pipeline.tracking import models, writers
from pipeline.tracking.outbox import Outbox
from pipeline.tracking.params import shorten
from pipeline.tracking.query import get_run
from pipeline.tracking.uri import check_reachable, server_up

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
RETRY_EVERY = 30.0  # seconds between attempts to reach a lost tracking server mid-run
FINAL_RETRIES, FINAL_RETRY_WAIT = 3, 5.0  # at the end of a run: a last chance before leaving records to `sync`


# ---------------------------------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run read, as MLflow's Dataset column and the run page show it (`name (digest)`)."""

    name: str  # "shapes/classification train"
    digest: str  # changes with the data: see pipeline/data/fingerprint.py
    source: str  # the data root, absolute
    context: str  # "training" or "validation", MLflow's input tag for what the run did with it
    rows: int  # images, shown as the dataset's profile


class Tracker:
    """One MLflow run. Open it with `Tracker.start(...)`; close it with `finish()` or by leaving a `with` block."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str, experiment_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._experiment_id = experiment_id
        self._finished = False
        # Highest step already logged per metric key of a resumed run: a resumed run replays the steps after its last
        # checkpoint exactly, so points at or below these steps are already there and are not logged twice.
        self._logged_steps: dict[str, int] = {}
        self._outbox: Outbox | None = None  # set by keep_offline: the server may go away mid-run
        self._last_retry = 0.0
        self._system = None  # mlflow's SystemMetricsMonitor, while it runs

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
              run_id: str | None = None, parent_run_id: str | None = None) -> Tracker:
        """Open a new run in `experiment` (created if missing), or resume `run_id` (set back to RUNNING).

        A resumed run stays in its own experiment under its own name. `parent_run_id` nests the run under another
        one (sweeps); MLflow's UI shows it as a child.
        """
        check_reachable(uri)
        client = mlflow.MlflowClient(uri)
        if parent_run_id:
            tags = {**tags, MLFLOW_PARENT_RUN_ID: parent_run_id}
        if run_id:
            tracker = cls._resume(client, uri, run_id)
        else:
            experiment_id = _experiment_id(client, uri, experiment)
            # user, source and git commit tags, as the fluent `mlflow.start_run` would set them
            run = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags())
            tracker = cls(client, run.info.run_id, experiment_id)
        tracker._log_new_params(params)
        tracker.set_tags(tags)
        return tracker

    @classmethod
    def _resume(cls, client: mlflow.MlflowClient, uri: str, run_id: str) -> Tracker:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise UserError(f"run {run_id} is not in tracking store {uri}; check the run id, or point tracking.uri / "
                            "MLFLOW_TRACKING_URI at the store that holds it") from e
        client.update_run(run_id, status="RUNNING")
        tracker = cls(client, run_id, run.info.experiment_id)
        tracker._logged_steps = {key: max(m.step for m in client.get_metric_history(run_id, key))
                                 for key in run.data.metrics}
        return tracker

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """An existing run, to add artifacts or tags to it (compare plots, exported models) without changing its
        status: unlike `start(run_id=...)` it is not set back to RUNNING. Do not use it as a `with` block."""
        check_reachable(uri)
        run = get_run(uri, run_id)
        return cls(mlflow.MlflowClient(uri), run.run_id, run.experiment_id)

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    def _log_new_params(self, params: dict[str, str]) -> None:
        """Log params the run does not have yet. MLflow refuses to change a logged param, so a resumed run keeps
        its old value and we warn about the difference instead of failing."""
        logged = self._client.get_run(self._run_id).data.params
        new = []
        for key, value in params.items():
            value = shorten(str(value), MAX_PARAM_VAL_LENGTH, what=f"param {key}")
            if key not in logged:
                new.append(Param(key, value))
            elif logged[key] != value:
                log.warning("param %s of run %s stays %r: MLflow cannot change a logged param (new value %r ignored)",
                            key, self._run_id, logged[key], value)
        self._client.log_batch(self._run_id, params=new)  # the client splits it into requests of MLflow's max size

    def log_params(self, params: dict[str, str]) -> None:
        """Params decided during the run (train.lr: auto's suggestion), through the outbox like metrics."""
        self._send({"op": "params", "params": {k: shorten(str(v), MAX_PARAM_VAL_LENGTH, what=f"param {k}")
                                               for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"op": "tags", "tags": {k: shorten(str(v), MAX_TAG_VAL_LENGTH, what=f"tag {k}")
                                           for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All metrics of one step in one request. NaN and inf are stored as they are (MLflow accepts them)."""
        new = {k: float(v) for k, v in metrics.items() if step > self._logged_steps.get(k, -1)}
        if new:
            self._send({"op": "metrics", "metrics": new, "step": step, "timestamp": int(time.time() * 1000)})

    def set_experiment_tags(self, tags: dict[str, str]) -> None:
        """Tags of the run's experiment (not kept by the outbox: set them before `keep_offline`)."""
        for key, value in tags.items():
            set_experiment_tag(self._client, self._experiment_id, key, value)

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        """Record the datasets as the run's inputs. MLflow keeps one input per dataset and context, so a resumed run
        logging them again adds nothing; a changed digest adds a dataset."""
        self._send({"op": "inputs", "datasets": [asdict(d) for d in datasets]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send({"op": "text", "text": text, "artifact_file": artifact_file})

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """A matplotlib figure; the file extension picks the format (`curves.png`)."""
        if self._outbox is None:
            self._client.log_figure(self._run_id, fig, artifact_file)
            return
        path = self._outbox.path.parent / "figures" / artifact_file  # a file the outbox can send later
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
        self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    # -- surviving a lost server -----------------------------------------------------------------------------------

    def keep_offline(self, outbox_path: Path) -> None:
        """From now on a call that fails because the tracking server is gone does not stop the run: it is kept in
        `outbox_path` (in order, on disk) and retried every RETRY_EVERY seconds; `pipeline sync` sends leftovers."""
        self._outbox = Outbox(outbox_path, self._run_id, self._client.tracking_uri)
        if urllib.parse.urlparse(self._client.tracking_uri).scheme in ("http", "https"):
            # Fail a request in seconds, not after MLflow's default of minutes of retries: the outbox retries later.
            for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                                ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")):
                os.environ.setdefault(name, value)

    @property
    def offline(self) -> bool:
        return bool(self._outbox and self._outbox.pending)

    def _send(self, record: dict) -> None:
        if self._outbox is None:
            self._apply(record)
            return
        if self._outbox.pending:
            self._outbox.append(record)
            self.flush()
            return
        try:
            self._apply(record)
        except Exception:
            if server_up(self._client.tracking_uri):
                raise  # not an outage: a real error
            self._outbox.append(record)
            self._last_retry = time.monotonic()
            log.warning(f"tracking server {self._client.tracking_uri} is unreachable; training goes on and "
                      f"tracking records are kept in {self._outbox.path} until it is back")

    def flush(self, force: bool = False, quiet: bool = False) -> bool:
        """Send what the outbox holds (at most every RETRY_EVERY seconds unless `force`); True once it is empty."""
        box = self._outbox
        if box is None or not box.pending:
            return True
        if not force and time.monotonic() - self._last_retry < RETRY_EVERY:
            return False
        self._last_retry = time.monotonic()
        if not server_up(box.uri):
            return False
        done = 0
        try:
            for record in box.pending:
                self._apply(record)
                done += 1
        except Exception:
            return False
        finally:
            box.sent(done)
        if not quiet:
            log.info(f"tracking server {box.uri} is back: sent {done} kept records")
        return True

    def _apply(self, record: dict) -> None:
        """Send one record; a store locked by another writer (sqlite, several runs at once) is waited for, and so is a
        dataset another run registers at the same moment (a sweep's children starting together): the second try links
        this run to the row the other one wrote (pipeline/tracking/writers.py)."""
        writers.patiently(lambda: self._write(record), duplicates=record["op"] == "inputs")

    def _write(self, record: dict) -> None:
        op, run_id = record["op"], self._run_id
        if op == "metrics":
            self._client.log_batch(run_id, metrics=[Metric(k, v, record["timestamp"], record["step"])
                                                    for k, v in record["metrics"].items()])
        elif op == "tags":
            self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "params":
            self._client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
        elif op == "inputs":
            self._client.log_inputs(run_id, datasets=[_dataset_input(DatasetRecord(**d)) for d in record["datasets"]])
        elif op == "artifact":
            self._client.log_artifact(run_id, record["path"], record["artifact_path"])
        elif op == "text":
            self._client.log_text(run_id, record["text"], record["artifact_file"])
        elif op == "status":
            self._client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def log_model(self, model: models.Pyfunc, name: str = "model", step: int = 0) -> str | None:
        """Log `model` (an MLflow pyfunc with its artifacts; pipeline/use/serve.py makes the runner's) as an MLflow
        LoggedModel of this run and return its URI (`models:/m-...`), or None when the tracking server is unreachable
        (a model is too big to keep for `sync`; the run's best.pt holds it).

        Metrics logged at `step` are linked to the model, so the model list in MLflow's UI can show them.
        """
        if self.offline:
            log.warning("the model was not logged to MLflow (tracking server unreachable); best.pt holds it")
            return None
        try:
            return models.log_model(self._client, self._run_id, self._experiment_id, model, name, step)
        except Exception:
            if self._outbox is None or server_up(self._client.tracking_uri):
                raise
            log.warning("the model was not logged to MLflow (tracking server lost); best.pt holds it")
            return None

    def log_system_metrics(self, every: float = 10.0) -> None:
        """MLflow's system metrics (CPU and memory use, GPU use and memory where NVML is installed) every `every`
        seconds, from a background thread, until the run ends; MLflow's run page shows them under System metrics."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
        try:
            self._system = SystemMetricsMonitor(self._run_id, sampling_interval=every, resume_logging=True,
                                                tracking_uri=self._client.tracking_uri)
            self._system.start()
        except Exception as err:  # noqa: BLE001  (psutil missing, a store that refuses): training goes on
            self._system = None
            log.info(f"note: system metrics are off ({type(err).__name__}: {err})")

    def _stop_system_metrics(self) -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED; `error` goes to the `error` tag first."""
        if status not in RUN_STATUSES:
            raise ValueError(f"finish: status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        self._stop_system_metrics()
        if error:
            self.set_tags({"error": error})
        self._send({"op": "status", "status": status, "end_time": int(time.time() * 1000)})
        self._finished = True
        if self.offline:
            for _ in range(FINAL_RETRIES):
                time.sleep(FINAL_RETRY_WAIT)
                if self.flush(force=True):
                    return
            log.warning(f"tracking server {self._outbox.uri} is still unreachable; run {self._run_id} "
                      f"stays RUNNING there. Its {len(self._outbox.pending)} kept records are in "
                      f"{self._outbox.path}: send them with 'pipeline sync {self._outbox.path.parent}'")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception, which then propagates."""
        if self._finished:
            return
        if exc is None:
            self.finish("FINISHED")
        else:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.finish(status, error="".join(traceback.format_exception_only(exc)).strip())


def set_experiment_tag(client: mlflow.MlflowClient, experiment_id: str, key: str, value: str) -> None:
    """MLflow's set_experiment_tag, when several runs set the same tag at once (a sweep's children starting together):
    its insert-or-update reads first, so the slower insert is tried again and then updates the row."""
    writers.patiently(lambda: client.set_experiment_tag(experiment_id, key, value), duplicates=True)


def mark_failed(uri: str, run_id: str, error: str) -> None:
    """End a run whose process could not end it (killed, its node lost) as FAILED, with the reason as its `error`
    tag, as the runner itself does for a failure it sees."""
    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "error", shorten(error, MAX_TAG_VAL_LENGTH, what="tag error"))
    client.set_terminated(run_id, status="FAILED")


def _dataset_input(d: DatasetRecord) -> DatasetInput:
    # source as MLflow's own local-files source writes it (LocalArtifactDatasetSource: type "local", {"uri": path})
    dataset = Dataset(d.name, d.digest, source_type="local", source=json.dumps({"uri": d.source}),
                      profile=json.dumps({"num_rows": d.rows}))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context)])


# The experiment's type as MLflow 3 records it: model training, not GenAI. The 3.17 UI (seen in headless Chromium) opens
# experiments in the mode of its GenAI / Model training switch or of the link's `workflowType` (tracking/ui.py) and
# reads this tag only where that switch is turned off, so the links the pipeline prints carry the mode themselves.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: mlflow.MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except MlflowException:  # another process of the sweep created it in between
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise UserError(f"experiment '{name}' is deleted in {uri}; restore it with 'mlflow experiments restore "
                        f"--experiment-id {experiment.experiment_id}', or rename the task file")
    if "mlflow.experimentKind" not in experiment.tags:  # made before the pipeline set it, or by hand
        for key, value in EXPERIMENT_KIND.items():
            set_experiment_tag(client, experiment.experiment_id, key, value)
    return experiment.experiment_id
