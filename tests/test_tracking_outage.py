"""A real `mlflow server` on loopback goes away mid-run: training finishes, records wait in the run folder, and
`pipeline sync` sends them once the server is back."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from loopback import free_port, wait_healthy
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.cli import main
from pipeline.tracking import outbox
from pipeline.train import engine, runner


class Server:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_healthy(self.uri, self.proc, 90)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the CLI and the uvicorn workers it spawned
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server", free_port())
    s.folder.mkdir()
    s.start()
    yield s
    s.stop()


@pytest.mark.e2e
@pytest.mark.server
def test_server_lost_mid_run_then_synced(said, task_file, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.run, "FINAL_RETRY_WAIT", 0.1)
    save = engine._save

    def save_then_lose_server(f, state, best):
        save(f, state, best)
        if state.epoch == 1:
            server.stop()

    monkeypatch.setattr(engine, "_save", save_then_lose_server)
    path = task_file(train={"epochs": 3}, tracking={"uri": server.uri, "log_model": True})
    started = time.monotonic()
    result = runner.run(path)
    assert time.monotonic() - started < 120  # no minutes of retries per call
    assert any("unreachable; training goes on" in line for line in said)
    assert any("pipeline sync" in line for line in said)
    box = outbox.Outbox.read(result.output_dir / outbox.NAME)
    assert box.run_id == result.run_id and box.pending[-1]["op"] == "status"

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(result.run_id).info.status == "RUNNING"  # the server never heard the end
    out = CliRunner().invoke(main, ["sync", str(result.output_dir)])
    assert out.exit_code == 0, out.output
    assert not (result.output_dir / outbox.NAME).exists()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/top1")] == [1, 2, 3]
    assert client.get_metric_history(result.run_id, "best/top1")
    report = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert "report/confusion_matrix.png" in report
    # nothing left: a second sync says so, in one line
    again = CliRunner().invoke(main, ["sync", str(result.output_dir)])
    assert again.exit_code == 1 and "nothing to sync" in again.output


def test_sync_while_server_is_down_keeps_the_records(tmp_path):
    box = outbox.Outbox(tmp_path / outbox.NAME, "abc", f"http://127.0.0.1:{free_port()}")
    box.append({"op": "tags", "tags": {"a": "b"}})
    out = CliRunner().invoke(main, ["sync", str(tmp_path)])
    assert out.exit_code == 1 and "is not reachable" in out.output
    assert outbox.Outbox.read(tmp_path / outbox.NAME).pending == [{"op": "tags", "tags": {"a": "b"}}]
