"""A team's tracking store for real: a throwaway PostgreSQL cluster, `mlflow server` on it, and sweeps whose children
run at once (`--jobs 2`) and as Ray tasks (`--ray local`) writing to it. Skipped, saying why, where this machine has no
PostgreSQL server binaries (initdb, pg_ctl) or no psycopg2 / Ray."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from loopback import free_port, wait_healthy
from mlflow import MlflowClient
from test_sweep_parallel import write_task

from pipeline.cli import main

pytestmark = [pytest.mark.server, pytest.mark.e2e]

BINARIES = ("initdb", "pg_ctl")


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and the server refuse to run as root: as root, run them as the `postgres` user
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def team_server():
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"no PostgreSQL server binaries here ({', '.join(missing)} not on PATH)")
    pytest.importorskip("psycopg", reason="mlflow server needs psycopg for a postgresql:// store")
    # a folder whose every parent the postgres user can enter (pytest's tmp folders are 0700 root)
    top = Path(tempfile.mkdtemp(prefix="pipeline-team-", dir="/tmp"))
    top.chmod(0o755)
    data, sockets = top / "pgdata", top / "sockets"
    for folder in (data, sockets):
        folder.mkdir()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    pg_port, port = free_port(), free_port()
    server = None
    try:
        subprocess.run(_as_postgres(["initdb", "-D", str(data), "-A", "trust", "-U", "postgres"]), check=True,
                       capture_output=True)
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(data), "-l", str(sockets / "pg.log"), "-w", "-o",
                                     f"-p {pg_port} -k {sockets} -c listen_addresses=127.0.0.1", "start"]),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres(["createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow"]),
                       check=True, capture_output=True)
        log = (top / "mlflow-server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow", "--artifacts-destination", str(top / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        uri = f"http://127.0.0.1:{port}"
        wait_healthy(uri, server, 120, lambda: (top / "mlflow-server.log").read_text()[-2000:])
        yield uri
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("how", [["--jobs", "2"], ["--ray", "local"]], ids=["jobs", "ray"])
def test_a_parallel_sweep_writes_every_run_to_the_team_server(how, team_server: str, tmp_path: Path, shapes: Path,
                                                              monkeypatch):
    if how[0] == "--ray":
        pytest.importorskip("ray", reason="--ray needs the ray extra")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server)  # as a team sets it; the task file names no store
    task = write_task(tmp_path, shapes, None, name=f"team_{how[0].strip('-')}")
    result = CliRunner().invoke(main, ["sweep", str(task), "model.backbone.name=resnet18,resnet34", "train.epochs=1",
                                       *how])
    assert result.exit_code == 0, result.output
    client = MlflowClient(team_server)
    experiment = client.get_experiment_by_name(task.stem)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(runs) == 3 and len(children) == 2
    assert {r.data.tags["backbone"] for r in children} == {"resnet18", "resnet34"}
    for child in children:
        assert child.info.status == "FINISHED" and "best/top1" in child.data.metrics
        steps = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(steps) == len({m.step for m in steps}) >= 2  # every step once
        # its best weights went to the server's artifact store, where runs:/ reads them
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
