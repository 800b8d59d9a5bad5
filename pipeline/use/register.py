"""`pipeline register RUN --name NAME` and `tracking.register: NAME`: a run's logged model as a new version of a
registered model in MLflow's model registry, tagged with what tells versions apart (task, backbone, depth, the
task's primary metric). The version then starts other runs (`model.backbone.weights=models:/NAME/1` or `@alias`) and
serves (`mlflow models serve -m models:/NAME/1 --env-manager local`).

What is registered is the run's logged model (the pyfunc of pipeline/use/serve.py, `models:/m-...`), so a run logged with
`tracking.log_model: false` is refused: its checkpoint still starts other runs as `runs:/<run id>`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline import tracking
from pipeline.tasks import registry


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    run_id: str
    alias: str | None = None

    def line(self) -> str:
        text = f"registered models:/{self.name}/{self.version} (run {self.run_id})"
        return text + (f"; models:/{self.name}@{self.alias} points to it" if self.alias else "")


def run_model(run: str, name: str, uri: str | None = None, alias: str | None = None,
              what: str = "--name") -> Registered:
    """Register the model logged by `run` (a run id or `runs:/<run id>`) in the store at `uri` (else as
    `tracking.resolve_uri`) as the next version of `name`. `what` names the setting `name` came from, for errors."""
    store = tracking.resolve_uri(uri)
    tracking.check_reachable(store)
    run_id = run.removeprefix("runs:/").strip("/")
    record = tracking.get_run(store, run_id)
    version = tracking.register(store, run_id, name, version_tags(record), alias=alias, what=what)
    return Registered(name, version, run_id, alias)


def version_tags(record: tracking.RunRecord) -> dict[str, str]:
    """task, backbone, depth, and the primary metric's name and best value, from the run's own record."""
    tags = {k: record.tags[k] for k in ("task", "backbone", "depth") if k in record.tags}
    entry = registry.TASKS.get(record.tags.get("task", ""))
    if entry is not None:
        primary = entry.primary  # e.g. val/top1; the runner logs its best value as best/top1
        tags["primary_metric"] = primary.name
        best = record.metrics.get(primary.best_key)
        if best is not None:
            tags[primary.name] = f"{best:.4f}"
    return tags
