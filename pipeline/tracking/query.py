"""Reading runs back as plain Python values, for sweep --resume, compare, predict and export."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.errors import UserError
from pipeline.tracking.uri import check_reachable


@dataclass(frozen=True)
class RunRecord:
    """One run as stored, in plain Python values, so that callers never handle MLflow's types."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get(MLFLOW_PARENT_RUN_ID)

    @property
    def wall_time(self) -> float | None:
        """Seconds from start to end; None while the run has not ended."""
        return self.end_time - self.start_time if self.end_time and self.start_time else None


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, name=info.run_name or "", experiment_id=info.experiment_id,
                     status=info.status, start_time=info.start_time / 1000 if info.start_time else None,
                     end_time=info.end_time / 1000 if info.end_time else None, params=dict(data.params),
                     tags=dict(data.tags), metrics=dict(data.metrics))


def get_run(uri: str, run_id: str) -> RunRecord:
    try:
        return _record(mlflow.MlflowClient(uri).get_run(run_id))
    except MlflowException as e:
        raise UserError(f"run '{run_id}' is not in tracking store {uri}; check the run id, or point --uri / "
                        "MLFLOW_TRACKING_URI (tracking.uri) at the store that holds it") from e


def search_runs(uri: str, experiment: str, parent_run_id: str | None = None) -> list[RunRecord]:
    """Every active run of `experiment` (only the children of `parent_run_id` when given), oldest first."""
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"experiment '{experiment}' is not in tracking store {uri}; experiments there: "
                        f"{', '.join(names) or 'none'} (or point --uri / MLFLOW_TRACKING_URI at another store)")
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'" if parent_run_id else ""
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], query, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs += [_record(r) for r in page]
        token = page.token
        if not token:
            return runs


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `key`, in step order; empty when the run never logged it."""
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def has_artifact(uri: str, run_id: str, artifact_path: str) -> bool:
    folder = str(Path(artifact_path).parent) if "/" in artifact_path else None
    return artifact_path in [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, folder)]


@dataclass(frozen=True)
class ModelFile:
    """One file of the artifacts a logged model carries (`artifacts/best.pt` of the runner's served model)."""

    uri: str
    model_id: str
    location: str  # the logged model's artifact location
    path: str  # the file, relative to it

    def download(self, dst_dir: str | Path) -> Path:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{self.location}/{self.path}",
                                                        dst_path=str(dst_dir), tracking_uri=self.uri))


def logged_model_file(uri: str, run: RunRecord, suffix: str) -> ModelFile | None:
    """The file ending in `suffix` among the artifacts of the model `run` logged (the newest, if several), or None."""
    client = mlflow.MlflowClient(uri)
    found = client.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    for model in found:
        files = [a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts")
                 if a.path.endswith(suffix)]
        if files:
            return ModelFile(uri, model.model_id, model.artifact_location, files[0])
    return None


def download_artifact(uri: str, run_id: str, artifact_path: str, dst_dir: str | Path) -> Path:
    """Copy one artifact file of a run into `dst_dir`; a `UserError` names what the run holds when it is missing."""
    client = mlflow.MlflowClient(uri)
    folder = str(Path(artifact_path).parent) if "/" in artifact_path else None
    present = [a.path for a in client.list_artifacts(run_id, folder)]
    if artifact_path not in present:
        raise UserError(f"run {run_id} has no artifact '{artifact_path}' ({folder or 'its root'} holds: "
                        f"{', '.join(present) or 'nothing'}) and logged no model that holds it; the run may have "
                        "failed before saving it, be a sweep's parent, or have run with tracking.log_checkpoint and "
                        "tracking.log_model false")
    return Path(client.download_artifacts(run_id, artifact_path, str(dst_dir)))
