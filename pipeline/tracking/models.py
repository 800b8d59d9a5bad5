"""Logged models: a pyfunc logged as an MLflow LoggedModel of a run, loaded back, and traced to the run that logged it.

These are the calls that go through MLflow's process-wide tracking URI (see `uri.process_tracking_uri`) rather than an
explicit client: MLflow's model logging and its `models:/` lookups read nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature

from pipeline.errors import UserError
from pipeline.tracking import registry
from pipeline.tracking.uri import process_tracking_uri


@dataclass(frozen=True)
class Pyfunc:
    """What `Tracker.log_model` logs: an MLflow pyfunc, the files it loads, and how it is called."""

    code: Path  # the file that makes the PythonModel (MLflow's "models from code": nothing is pickled)
    artifacts: dict[str, str]  # name -> local file, copied into the logged model (`context.artifacts` on load)
    input_example: pd.DataFrame  # kept with the model (the UI shows it) and predicted once when logging
    signature: ModelSignature
    requirements: list[str]  # pip requirements; listing them skips MLflow's slow requirement inference


def log_model(client: mlflow.MlflowClient, run_id: str, experiment_id: str, model: Pyfunc, name: str,
              step: int) -> str:
    """`Tracker.log_model` without its handling of a lost server: log `model` as a LoggedModel of run `run_id` in
    `experiment_id` and return its URI (`models:/m-...`). See `Tracker.log_model` for what the arguments mean."""
    # Create the LoggedModel ourselves: left to MLflow without an active fluent run, it lands in the default
    # experiment instead of this run's one.
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                        params=client.get_run(run_id).data.params)
    # `Model.log` is what `mlflow.pyfunc.log_model` calls, plus `run_id`: it links the model to this run without an
    # active fluent run, which `mlflow.start_run` would end (FINISHED) on leaving. MLflow loads the logged model once
    # and predicts the example to check that it serves.
    with process_tracking_uri(client.tracking_uri):
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, python_model=str(model.code),
                         artifacts=model.artifacts, model_id=logged.model_id, run_id=run_id, step=step,
                         signature=model.signature, input_example=model.input_example,
                         pip_requirements=model.requirements)
    return info.model_uri


def load_model(uri: str, model_uri: str) -> torch.nn.Module:
    """The torch module inside the pyfunc logged by `Tracker.log_model` (`models:/m-...`) in the store at `uri`: its
    `module` attribute, which pipeline/use/serve.py sets to the task's inference module (normalised images in, the
    task's output tensors out), in eval mode."""
    # `models:/` URIs are looked up in the process-wide tracking store, which may point elsewhere
    with process_tracking_uri(uri):
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().module


def model_source_run(uri: str, model_uri: str) -> str:
    """The id of the run that logged the model at `model_uri` (`models:/m-...`, `models:/name/1`, `models:/name@a`)."""
    if registry.is_registered(model_uri):  # the registry's own lookups name what is missing: model, version, alias
        return registry.version_run(uri, model_uri)
    try:
        with process_tracking_uri(uri):  # `models:/` URIs resolve against the process-wide store
            run_id = mlflow.models.get_model_info(model_uri).run_id
    except MlflowException as e:
        raise UserError(f"model '{model_uri}' is not in tracking store {uri}; check the URI (the run's Artifacts / "
                        "Logged models tab shows it), or point --uri / MLFLOW_TRACKING_URI (tracking.uri) at its "
                        "store") from e
    if not run_id:
        raise UserError(f"model '{model_uri}' is linked to no run, so its config and classes are unknown; pass the "
                        "run id or a checkpoint path instead")
    return run_id

