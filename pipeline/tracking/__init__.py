"""MLflow tracking, the only package of `pipeline` that imports mlflow (besides pipeline/use/serve.py: the served model
is an MLflow pyfunc). One module per job:

    uri.py      where the runs go: `resolve_uri`, `check_reachable`, `check_exists`, `server_up`, `process_tracking_uri`
    run.py      one run: `Tracker` (start / resume / attach, params, tags, metrics, dataset inputs, artifacts, finish,
                the outbox that keeps records while the server is unreachable), `Silent` for ranks other than 0
    params.py   `flatten`: a config as MLflow params, shortened where too long
    sync.py     `sync`: what a run kept while its server was unreachable, sent later
    models.py   logged models: `Pyfunc` (what is logged), `Tracker.log_model`'s work, `load_model`,
                `model_source_run`
    query.py    reading runs back as plain values: `RunRecord`, `get_run`, `search_runs`, `metric_history`,
                `download_artifact`
    sources.py  run ids, `runs:/` and `models:/` URIs resolved to a run's checkpoint file: `is_tracked`,
                `resolve_source`, `downloaded`, `RunFile`
    registry.py the model registry: `register_run` (a run's logged model as a new version, with tags that tell
                versions apart), `register`, `version_run`
    served.py   what a run logs as its model: `pyfunc` (the served model's code file, checkpoint, signature)
    outbox.py   records kept on disk while the server is unreachable, sent later
    writers.py  many writers on one store: `patiently` waits for a locked sqlite store and a row inserted at once
    logs.py     MLflow's own log lines: `quiet_console` keeps its INFO lines for the run's log only
    ui.py       `ui`: MLflow's web UI on a local store, stopped with all its processes; `experiment_link` and
                `sweep_view`, the UI pages printed at the end of runs and sweeps; `view_tags`, what they open on

Callers use the names below (`from pipeline import tracking; tracking.Tracker.start(...)`). Constants that tune
behaviour (`run.RETRY_EVERY`, `run.FINAL_RETRY_WAIT`, ...) are read from their own module: set or patch them there.
`tracking.ui` is the function, which hides the `ui` module; reach the module as `sys.modules["pipeline.tracking.ui"]`.
"""
from pipeline.tracking.logs import LOGGERS, quiet_console
from pipeline.tracking.models import Pyfunc, load_model, model_source_run
from pipeline.tracking.params import TRUNCATION_MARK, flatten
from pipeline.tracking.query import RunRecord, download_artifact, get_run, metric_history, search_runs
from pipeline.tracking.registry import Registered, register, register_run, version_tags
from pipeline.tracking.run import RUN_STATUSES, DatasetRecord, Tracker, mark_failed
from pipeline.tracking.served import pyfunc as served_pyfunc
from pipeline.tracking.silent import Silent
from pipeline.tracking.sources import CHECKPOINT_ARTIFACT, RunFile, downloaded, is_tracked
from pipeline.tracking.sources import resolve as resolve_source
from pipeline.tracking.sync import sync
from pipeline.tracking.ui import address as ui_address
from pipeline.tracking.ui import experiment_link, start_hint, sweep_view, ui, view_tags
from pipeline.tracking.uri import (
    DEFAULT_URI,
    check_exists,
    check_reachable,
    process_tracking_uri,
    resolve_uri,
    server_up,
)

__all__ = [
    "CHECKPOINT_ARTIFACT", "DEFAULT_URI", "LOGGERS", "RUN_STATUSES", "TRUNCATION_MARK", "check_exists",
    "check_reachable",
    "DatasetRecord", "download_artifact", "downloaded", "experiment_link", "flatten", "get_run", "is_tracked",
    "load_model", "mark_failed", "metric_history", "model_source_run", "process_tracking_uri", "Pyfunc",
    "quiet_console", "register", "register_run", "Registered", "resolve_source", "resolve_uri", "RunFile",
    "RunRecord", "search_runs", "served_pyfunc", "server_up", "Silent", "start_hint", "sweep_view", "sync", "Tracker",
    "ui", "ui_address", "version_tags", "view_tags",
]
