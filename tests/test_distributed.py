"""torchrun with 2 CPU processes (gloo): one FINISHED MLflow run, and the metrics of one process on the same global
batch. BatchNorm in eval mode (finetune.bn=eval) makes the split batch exactly equivalent; with BN training on each
process's half batch the runs would differ by design (train.sync_bn, CUDA only, closes that gap on GPUs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.train import checkpoint, runner

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def test_two_processes_match_one_on_the_same_global_batch(task_file, uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 2, "precision": "fp32", "log_every": 1},
                     finetune={"bn": "eval"}, tracking={"uri": uri, "log_model": False, "experiment": "single"})
    single = runner.run(path, (f"train.output_dir={tmp_path / 'one'}", "data.batch_size=16"))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline", "run",
         str(path), f"train.output_dir={tmp_path / 'two'}", "data.batch_size=8", "tracking.experiment=ddp"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done in") == 1  # one voice: rank 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    ddp = runs[0]
    assert ddp.data.metrics["val/top1"] == pytest.approx(single.metrics["val/top1"], abs=0.05)
    assert ddp.data.metrics["val/loss"] == pytest.approx(single.metrics["val/loss"], abs=1e-3)
    one = [m.value for m in client.get_metric_history(single.run_id, "train/loss")]
    two = [m.value for m in client.get_metric_history(ddp.info.run_id, "train/loss")]
    assert two == pytest.approx(one, abs=1e-3)  # step by step: the same samples, gradients averaged over ranks
    assert checkpoint.load(tmp_path / "two" / checkpoint.LAST)["fit"]["epoch"] == 2  # rank 0 wrote it
