"""Logged models: a module logged as an MLflow LoggedModel of a run, loaded back, and traced to the run that logged it.

These are the calls that go through MLflow's process-wide tracking URI (see `uri.process_tracking_uri`) rather than an
explicit client: MLflow's model logging and its `models:/` lookups read nothing else.
"""
from __future__ import annotations

import copy
import importlib.metadata
from typing import Literal

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from pipeline.errors import UserError
from pipeline.tracking.uri import process_tracking_uri

# Pinned in the logged model's requirements.txt; listing them skips MLflow's slow requirement inference.
MODEL_REQUIREMENTS = ("torch", "torchvision", "timm")


def log_model(client: mlflow.MlflowClient, run_id: str, experiment_id: str, model: torch.nn.Module,
              input_example: np.ndarray, name: str, step: int, serialization: Literal["pt2", "pickle"]) -> str:
    """`Tracker.log_model` without its handling of a lost server: log `model` as a LoggedModel of run `run_id` in
    `experiment_id` and return its URI (`models:/m-...`). See `Tracker.log_model` for what the arguments mean."""
    example = np.asarray(input_example, dtype=np.float32)
    if serialization == "pt2" and example.shape[0] < 2:
        raise ValueError("log_model: input_example needs a batch of at least 2 for pt2: torch.export fixes a "
                         "batch dimension of size 1, and the logged model would then accept only batch 1")
    model = copy.deepcopy(model).float().cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example))
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"log_model: the model returned {type(output).__name__}, not a tensor; pass a wrapper "
                        "module that returns one tensor")
    signature = infer_signature(example, output.numpy())
    # Create the LoggedModel ourselves: left to MLflow without an active fluent run, it lands in the default
    # experiment instead of this run's one.
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                        params=client.get_run(run_id).data.params)
    # The example goes in as a tensor: MLflow then only traces with it (pt2) and does not store it as JSON (15 MB
    # for two 224 px images) nor re-run the model to validate serving; the signature records the shapes.
    # `run_id` reaches `mlflow.models.Model.log` through the flavor's **kwargs: it links the model to this run
    # without an active fluent run, which `mlflow.start_run` would end (FINISHED) on leaving.
    with process_tracking_uri(client.tracking_uri):
        info = mlflow.pytorch.log_model(
            model, name=name, model_id=logged.model_id, run_id=run_id, step=step, signature=signature,
            input_example=torch.from_numpy(example), serialization_format=serialization,
            pip_requirements=_model_requirements(serialization))
    return info.model_uri


def load_model(uri: str, model_uri: str) -> torch.nn.Module:
    """The module logged by `Tracker.log_model` (`models:/m-...`) in the store at `uri`.

    A pt2 model comes back as a `torch.fx.GraphModule` that takes the same input and returns the same output.
    """
    # `models:/` URIs are looked up in the process-wide tracking store, which may point elsewhere
    with process_tracking_uri(uri):
        return mlflow.pytorch.load_model(model_uri)


def model_source_run(uri: str, model_uri: str) -> str:
    """The id of the run that logged the model at `model_uri` (`models:/m-...`, `models:/name/1`, `models:/name@a`)."""
    try:
        with process_tracking_uri(uri):  # `models:/` URIs resolve against the process-wide store
            run_id = mlflow.models.get_model_info(model_uri).run_id
    except MlflowException as e:
        raise UserError(f"model '{model_uri}' is not in tracking store {uri}; check the URI (the run's Artifacts / "
                        "Logged models tab shows it), or point --uri / MLFLOW_TRACKING_URI at its store") from e
    if not run_id:
        raise UserError(f"model '{model_uri}' is linked to no run, so its config and classes are unknown; pass the "
                        "run id or a checkpoint path instead")
    return run_id


def _model_requirements(serialization: str) -> list[str]:
    # MLflow's pickle format unpickles with cloudpickle; pt2 needs only torch
    packages = MODEL_REQUIREMENTS + (("cloudpickle",) if serialization == "pickle" else ())
    # local version labels (`2.5.1+cpu`) are not on PyPI: pin the public version
    return [f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}" for pkg in packages]
