"""`pipeline ui`: MLflow's web UI on a local tracking store, and the links that open its pages for our runs."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import mlflow

from pipeline.errors import UserError
from pipeline.tracking.uri import DEFAULT_URI, check_reachable, resolve_uri

log = logging.getLogger(__name__)

HOST, PORT = "127.0.0.1", 5000  # where `pipeline ui` serves by default, and so where printed links point
STOP_GRACE = 5.0  # seconds the server's processes get to stop on SIGTERM before SIGKILL
LISTED = 10  # experiments `pipeline ui` prints a link for, most recently active first

# MLflow 3.17's UI picks GenAI mode (traces, token usage) or model-training mode (the runs table, metrics, charts) from
# this query parameter, else from its GenAI / Model training switch; the experiment's kind tag does not decide it.
_TRAINING_MODE = "workflowType=machine_learning"
_CHART_MODE = "compareRunsMode=CHART"  # the runs page's charts rather than its table
NUM_PARAMS = "model/num_params"  # logged by every training run at its start (pipeline/train/describe.py)
# The runs table shows no metric columns until a user picks some, and only in that browser. A view saved the way the
# UI's own Share button saves one (an experiment tag) and named in the link is what the link opens, for anyone.
VIEW_KEY = "pipeline"
_SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key; the UI applies it for `viewStateShareKey=<key>`
_PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"  # the UI's default charts start with this metric


def is_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def address(uri: str) -> str:
    """Where the UI of the store at `uri` is: the tracking server itself, else `pipeline ui`'s default address."""
    return uri.rstrip("/") if is_server(uri) else f"http://{HOST}:{PORT}"


def experiment_link(base: str, experiment_id: str, view: str | None = VIEW_KEY) -> str:
    """The experiment's runs in model-training mode; with `view` (a key of `view_tags`), as that view set them up:
    its charts, the metric-against-depth section first (the table is a click away)."""
    link = f"{base}/#/experiments/{experiment_id}/runs?{_TRAINING_MODE}"
    return f"{link}&viewStateShareKey={view}&{_CHART_MODE}" if view else link


def sweep_view(parent_run_id: str) -> str:
    """The key of a sweep's own view: its children only."""
    return f"{VIEW_KEY}-sweep-{parent_run_id[:8]}"


def view_tags(metrics: list[str], order_by: str, key: str = VIEW_KEY, parent_run_id: str | None = None
              ) -> dict[str, str]:
    """Experiment tags for the view `experiment_link(..., view=key)` opens: the training runs (a sweep's parent logs
    no metrics and stays out), or with `parent_run_id` that sweep's children alone, sorted by metric `order_by`
    (ascending; runs without it last). Its charts open on a section of scatter plots, each metric but the model's own
    against `order_by`, the first one first, above the charts MLflow makes for every metric; its table shows a column
    per metric in `metrics` (MLflow 3.17 shows them in name order), the epochs each run trained (runs of other lengths
    are told apart) and the Dataset column. The first metric becomes the experiment's primary one."""
    search = (f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else
              f"metrics.`{NUM_PARAMS}` > 0")  # every training run logs its parameter count; a sweep's parent none
    state = {"searchFilter": search, "orderByKey": _column("metrics", order_by), "orderByAsc": True,
             "selectedColumns": [*(_column("metrics", m) for m in metrics), _column("params", "train.epochs"),
                                 _column("attributes", "Dataset")],
             **_scatter_section(f"vs {order_by.split('/')[-1]}", order_by,
                                [m for m in metrics if m != order_by and not m.startswith("model/")])}
    return {_SHARED_VIEW_TAG + key: json.dumps(state), _PRIMARY_METRIC_TAG: metrics[0]}


def _scatter_section(name: str, x: str, ys: list[str]) -> dict:
    """A chart section of the runs page, first: one scatter plot (a point per run) of each metric in `ys` against `x`.
    The shapes are those of the UI's own chart state (RunsChartsScatterCardConfig in MLflow 3.17's bundle); the
    charts for the other metrics are still made, in sections after it (isAccordionReordered keeps this one first)."""
    if not ys:
        return {}
    section = "pipeline-section"
    charts = [{"uuid": f"pipeline-chart-{i}", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": section,
               "deleted": False, "isGenerated": False, "xaxis": {"key": x, "type": "METRIC"},
               "yaxis": {"key": y, "type": "METRIC"}} for i, y in enumerate(ys)]
    # two wide, tall cards a row (MLflow's default: three of 360 px), beside no run list (the legends name the runs):
    # a point at the top left stays clear of the plot's toolbar
    return {"compareRunSections": [{"uuid": section, "name": name, "display": True, "isReordered": True,
                                    "deleted": False, "isGenerated": False, "columns": 2, "cardHeight": 480}],
            "compareRunCharts": charts, "isAccordionReordered": True, "runListHidden": True}


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # how the UI names a column and a sort key: metrics.`best/top1`


def start_hint(uri: str) -> str:
    """What serves the links printed for `uri`: nothing to do for a tracking server, else `pipeline ui`."""
    if is_server(uri):
        return ""
    return " (serve it with: pipeline ui" + ("" if uri == DEFAULT_URI else f" --uri {uri}") + ")"


# ---------------------------------------------------------------------------------------------------------------------
# The server


def ui(uri: str | None, host: str = HOST, port: int = PORT) -> int:
    """Run `mlflow ui` on the store (`uri`, else as `resolve_uri`) until it exits or this process gets SIGINT or
    SIGTERM, which stop all of its processes; returns its exit code (0 when stopped by a signal).

    A tracking server serves its own UI, so for an http(s) store there is nothing to start.
    """
    uri = resolve_uri(uri)
    if is_server(uri):
        raise UserError(f"tracking store {uri} is a server, which serves the UI itself: open {uri} in a browser")
    check_reachable(uri)
    _check_port_free(host, port)
    base = f"http://{host}:{port}"
    log.info(f"MLflow UI for {uri} on {base} (Ctrl-C stops it)")
    for name, experiment_id, has_view in _experiments(uri):
        log.info(f"  {name}: {experiment_link(base, experiment_id, VIEW_KEY if has_view else None)}")
    # Its own process group: MLflow's server runs uvicorn (and job runners) in child processes, which a signal to
    # the `mlflow ui` process alone leaves running. One worker: a local UI has one user; MLflow's default is 4. No job
    # runners unless asked for: seven processes that serve GenAI features (judges, issue detection), not training runs.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                               "--port", str(port), "--workers", "1"], start_new_session=True, env=env)
    return _serve(server)


def _serve(server: subprocess.Popen) -> int:
    stopping: list[float] = []  # when the first SIGINT / SIGTERM came

    def stop(_signum, _frame) -> None:
        # a second Ctrl-C does not wait for the server's graceful shutdown
        _signal_group(server.pid, signal.SIGKILL if stopping else signal.SIGTERM)
        stopping.append(time.monotonic())

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                # uvicorn waits for open requests before it exits; a browser can hold one for long
                if stopping and time.monotonic() - stopping[0] > STOP_GRACE:
                    _signal_group(server.pid, signal.SIGKILL)
    finally:
        _stop_group(server.pid)  # what the server left: its children outlive it when it dies first
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stopping else code


def _stop_group(pgid: int) -> None:
    """SIGTERM to every process left in group `pgid`, SIGKILL to those still there after STOP_GRACE."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not _signal_group(pgid, 0):
            return
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid` (0: only check); False once no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, port)) == 0:
            raise UserError(f"{host}:{port} is in use (another 'pipeline ui' or 'mlflow ui'?); open "
                            f"http://{host}:{port} if it is one, or pass --port")


def _experiments(uri: str) -> list[tuple[str, str, bool]]:
    """(name, id, whether it has our view) of the store's experiments, most recently active first, at most LISTED."""
    client = mlflow.MlflowClient(uri)
    found = client.search_experiments(max_results=LISTED + 1, order_by=["last_update_time DESC"])
    # MLflow's "Default" experiment, made with every store, holds nothing of ours unless someone logged there
    return [(e.name, e.experiment_id, _SHARED_VIEW_TAG + VIEW_KEY in e.tags) for e in found
            if e.name != "Default" or client.search_runs([e.experiment_id], max_results=1)][:LISTED]
