"""Load: 50 short training runs back to back against one `mlflow server`, 4 clients at a time; every run must end
FINISHED with its full metric history. Slow (minutes): `pytest -m slow tests/test_soak.py`."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from loopback import free_port
from mlflow import MlflowClient
from test_tracking_outage import Server

RUNS, CLIENTS, EPOCHS = 50, 4, 2
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.e2e
@pytest.mark.timeout(1800)  # 50 runs, 4 at a time on 2 cores: about 10 minutes
def test_fifty_runs_four_clients_one_server(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server", free_port())
    server.folder.mkdir()
    server.start()
    try:
        path = task_file(train={"epochs": EPOCHS, "log_every": 1}, data={"batch_size": 30},
                         tracking={"uri": server.uri, "log_model": False, "experiment": "soak"})
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

        def one(i: int) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), f"seed={i}",
                                   f"train.output_dir={tmp_path / 'runs' / str(i)}"],
                                  env=env, capture_output=True, text=True, timeout=900)

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one, range(RUNS)))
        failed = [r.stderr[-500:] for r in results if r.returncode != 0]
        assert not failed, failed[:2]
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("soak").experiment_id], max_results=1000)
        assert len(runs) == RUNS
        for run in runs:
            assert run.info.status == "FINISHED", run.info.run_id
            history = client.get_metric_history(run.info.run_id, "val/top1")
            assert [m.step for m in history] == list(range(1, EPOCHS + 1))
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            assert steps == sorted(set(steps)) and len(steps) == EPOCHS * 2  # 60 images / batch 30, every step
        assert not list((tmp_path / "runs").glob("*/tracking_outbox.jsonl"))  # nothing was left behind unsent
    finally:
        server.stop()
