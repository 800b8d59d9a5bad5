"""The MLflow model registry: a run's logged model registered as a new version, and `models:/<name>/<version>` or
`models:/<name>@<alias>` traced back to the run that logged it.

MLflow's registry store looks logged models up through the process-wide tracking URI, so these calls run inside
`process_tracking_uri` besides using an explicit client.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from pipeline.errors import UserError
from pipeline.tracking.query import RunRecord, get_run
from pipeline.tracking.uri import check_reachable, process_tracking_uri


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    run_id: str
    alias: str | None = None

    def line(self) -> str:
        text = f"registered models:/{self.name}/{self.version} (run {self.run_id})"
        return text + (f"; models:/{self.name}@{self.alias} points to it" if self.alias else "")


def register_run(uri: str, run: str, name: str, primary: Mapping[str, tuple[str, str]], alias: str | None = None,
                 what: str = "--name") -> Registered:
    """Register the model logged by `run` (a run id or `runs:/<run id>`) in the store at `uri` as the next version of
    `name`, tagged with the run's task, backbone, depth and primary metric. `primary`: for each task the caller knows,
    its primary metric and the metric its best value is logged as (classification: val/top1, best/top1). `what` names
    the setting `name` came from, for errors."""
    check_reachable(uri)
    run_id = run.removeprefix("runs:/").strip("/")
    record = get_run(uri, run_id)
    version = register(uri, run_id, name, version_tags(record, primary), alias=alias, what=what)
    return Registered(name, version, run_id, alias)


def version_tags(record: RunRecord, primary: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """task, backbone, depth, and the primary metric's name and best value, from the run's own record."""
    tags = {k: record.tags[k] for k in ("task", "backbone", "depth") if k in record.tags}
    metric, best_key = primary.get(record.tags.get("task", ""), (None, None))
    if metric is not None:
        tags["primary_metric"] = metric
        best = record.metrics.get(best_key)
        if best is not None:
            tags[metric] = f"{best:.4f}"
    return tags


def register(uri: str, run_id: str, name: str, tags: dict[str, str], alias: str | None = None,
             what: str = "--name") -> int:
    """Register the model run `run_id` logged as a new version of registered model `name` (created if missing), with
    `tags` on the version and `alias` pointing at it; returns the version number. `what` names the setting the name
    came from in errors (`--name`, `tracking.register`)."""
    client = mlflow.MlflowClient(uri)
    run = get_run(uri, run_id)
    model_id = _logged_model(client, run.experiment_id, run_id)
    with process_tracking_uri(uri):
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise UserError(f"{what}: '{name}' cannot name a registered model ({_reason(e)})") from None
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                              model_id=model_id)
        # The logged model's page lists the versions made from it (what mlflow.register_model records there).
        logged = client.get_logged_model(model_id)
        links = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        links.append({"name": name, "version": version.version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
        if alias:
            try:
                client.set_registered_model_alias(name, alias, version.version)
            except MlflowException as e:
                client.delete_model_version(name, version.version)  # all or nothing: no version without its alias
                raise UserError(f"--alias: '{alias}' cannot name an alias ({_reason(e)}); nothing was registered") \
                    from None
    return int(version.version)


def _logged_model(client: mlflow.MlflowClient, experiment_id: str, run_id: str) -> str:
    """The id of the model the run logged (the runner logs one, `tracking.log_model`); the newest if several."""
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    if not found:
        raise UserError(f"run {run_id} logged no model to register (it ran with tracking.log_model: false, or its "
                        "tracking server was unreachable at its end); rerun it with tracking.log_model: true, or "
                        f"start other runs from its checkpoint with model.backbone.weights=runs:/{run_id}")
    return found[0].model_id


def is_registered(model_uri: str) -> bool:
    """`models:/<name>/<version>` or `models:/<name>@<alias>`, not a logged model's `models:/m-...`."""
    body = model_uri.removeprefix("models:/")
    return "/" in body.strip("/") or "@" in body


def version_run(uri: str, model_uri: str) -> str:
    """The run that logged registered version `models:/<name>/<version>` (or `latest`) or `models:/<name>@<alias>`."""
    body = model_uri.removeprefix("models:/").strip("/")
    name, alias = body.split("@", 1) if "@" in body else (body, None)
    name, _, version = name.partition("/") if alias is None else (name, "", "")
    client = mlflow.MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(f"no registered model '{name}' in tracking store {uri} (registered there: "
                        f"{', '.join(names) or 'none'}); register a run's model with 'pipeline register RUN --name "
                        f"{name}'") from None
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, str(versions[-1]) if version == "latest" and versions else version)
    except MlflowException:
        if alias is not None:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise UserError(f"registered model '{name}' has no alias '{alias}' (its aliases: "
                            f"{', '.join(aliases) or 'none'}); set one with 'pipeline register RUN --name {name} "
                            "--alias ALIAS' or in MLflow's UI") from None
        raise UserError(f"registered model '{name}' has no version '{version}' (its versions: "
                        f"{', '.join(map(str, versions)) or 'none'}); write models:/{name}/<version> or "
                        f"models:/{name}@<alias>") from None
    if found.run_id:
        return found.run_id
    if found.model_id:  # registered from a logged model by other means: the logged model knows its run
        with process_tracking_uri(uri):
            source_run = client.get_logged_model(found.model_id).source_run_id
        if source_run:
            return source_run
    raise UserError(f"model '{model_uri}' is linked to no run, so its checkpoint is unknown; give the run id or a "
                    "checkpoint path instead")


def _reason(err: MlflowException) -> str:
    return " ".join(err.message.split())[:160]

