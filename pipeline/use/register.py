"""`pipeline register RUN --name NAME`: a run's logged model as a new version of a registered model in MLflow's model
registry, tagged with what tells versions apart (task, backbone, depth, the task's primary metric). The version then
starts other runs (`model.backbone.weights=models:/NAME/1` or `@alias`) and serves (`mlflow models serve -m
models:/NAME/1 --env-manager local`). A run does the same at its end with `tracking.register: NAME`.

What is registered is the run's logged model (the pyfunc of pipeline/tracking/served.py, `models:/m-...`), so a run
logged with `tracking.log_model: false` is refused: its checkpoint still starts other runs as `runs:/<run id>`.
"""
from __future__ import annotations

from pipeline import tracking
from pipeline.tasks import registry


def run_model(run: str, name: str, uri: str | None = None, alias: str | None = None) -> tracking.Registered:
    """Register the model logged by `run` (a run id or `runs:/<run id>`) in the store at `uri` (else as
    `tracking.resolve_uri`) as the next version of `name`."""
    primary = {task: (entry.primary.name, entry.primary.best_key) for task, entry in registry.TASKS.items()}
    return tracking.register_run(tracking.resolve_uri(uri), run, name, primary, alias=alias)
