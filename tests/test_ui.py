"""`pipeline ui` as users run it: a real process serving MLflow's UI on 127.0.0.1, and what it leaves after a signal."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from loopback import free_port, port_open

from pipeline import tracking
from pipeline.cli import main

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (the server's own session included: it is still a descendant)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            # the command name in field 2 may hold spaces; the parent pid is the second field after it
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_ui_serves_the_store_and_leaves_nothing_after_sigterm(uri: str, tmp_path: Path):
    tracker = tracking.Tracker.start(uri, "tiny", run_name="r", params={}, tags={})
    tracker.finish()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ui = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--uri", uri, "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120  # MLflow's server takes 10-30 s to start on two busy cores
        while True:
            assert ui.poll() is None, ui.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the UI did not answer within 120 s"
                time.sleep(0.5)
        started = descendants(ui.pid)
        assert len(started) >= 2  # `mlflow ui` and the uvicorn server it runs, at least
        ui.send_signal(signal.SIGTERM)
        output, _ = ui.communicate(timeout=30)
    finally:
        if ui.poll() is None:  # a failed assertion above: do not leave the test's own server behind
            ui.kill()
            ui.communicate()
    assert ui.returncode == 0, output
    experiment_id = tracker.experiment_id
    assert f"tiny: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in output
    assert not port_open(port)
    assert not [pid for pid in started if alive(pid)], output


def test_ui_refuses_a_busy_port_and_a_server_store_in_one_line(uri: str):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(main, ["ui", "--uri", uri, "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 1 and "is in use" in result.output and len(result.output.splitlines()) == 1
    result = CliRunner().invoke(main, ["ui", "--uri", "http://127.0.0.1:5000"])
    assert result.exit_code == 1 and "serves the UI itself" in result.output


def test_the_view_opens_on_the_table_sorted_by_depth_and_on_scatter_plots_against_depth():
    tags = tracking.view_tags(["best/mAP", "model/depth", "model/gflops", "train/wall_time_s"], order_by="model/depth")
    state = json.loads(tags["mlflow.sharedViewState.pipeline"])
    assert tags["mlflow.experiment.primaryMetric.name"] == "best/mAP"
    assert state["orderByKey"] == "metrics.`model/depth`" and state["orderByAsc"] is True
    # runs' lengths told apart
    assert state["selectedColumns"][-2:] == ["params.`train.epochs`", "attributes.`Dataset`"]
    assert state["searchFilter"] == "metrics.`model/num_params` > 0"  # training runs: a sweep's parent logs no metrics
    # one section, kept first, of one scatter plot per metric that is not the model's own, each against depth
    [section] = state["compareRunSections"]
    assert state["isAccordionReordered"] is True and section["display"] is True
    charts = state["compareRunCharts"]
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in charts] == [
        ("SCATTER", "model/depth", "best/mAP"), ("SCATTER", "model/depth", "train/wall_time_s")]
    assert {c["metricSectionId"] for c in charts} == {section["uuid"]}
    assert len({c["uuid"] for c in charts}) == len(charts)
    # a sweep's own view: its children alone
    sweep = tracking.view_tags(["best/mAP", "model/depth"], "model/depth", key="pipeline-sweep-0123abcd",
                               parent_run_id="0123abcd" * 4)
    assert json.loads(sweep["mlflow.sharedViewState.pipeline-sweep-0123abcd"])["searchFilter"] == (
        f"tags.`mlflow.parentRunId` = '{'0123abcd' * 4}'")
    # nothing to plot against depth: no section (an empty one would sit above MLflow's own charts)
    state = json.loads(tracking.view_tags(["model/depth"], "model/depth")["mlflow.sharedViewState.pipeline"])
    assert "compareRunCharts" not in state and "compareRunSections" not in state
