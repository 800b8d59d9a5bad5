"""What the engine tells about where the time goes and how gradients flow: train/data_wait, train/error,
grad_norm/<stage> of the trainable stages, the data-wait note, and the thread count a run logs."""
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline.tasks.base import TRAIN_ERROR
from pipeline.train import engine, optim, runner


class SlowLoader:
    """Batches that take `delay` seconds each to arrive."""

    def __init__(self, batches: int, delay: float):
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            time.sleep(self.delay)
            yield torch.randn(4, 8), torch.randint(0, 3, (4,))


def tiny_fit_parts():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    groups = [{"params": list(model[0].parameters()), "stage": "body", "base_lr": 0.1, "lr": 0.1},
              {"params": list(model[2].parameters()), "stage": "head", "base_lr": 0.1, "lr": 0.1}]

    def loss(m, batch):
        x, y = batch
        logits = m(x)
        return {"ce": nn.functional.cross_entropy(logits, y), TRAIN_ERROR: (logits.argmax(1) != y).float().mean()}

    return model, groups, loss


def one_epoch(loader, grad_norms=False, freeze_body=False, log_every=2):
    model, groups, loss = tiny_fit_parts()
    if freeze_body:
        model[0].requires_grad_(False)
        groups = groups[1:]  # a frozen stage has no optimizer group
    optimizer = torch.optim.SGD(groups, lr=0.1)
    logged = []
    settings = engine.StepSettings(device=torch.device("cpu"), precision="fp32", channels_last=False,
                                   log_every=log_every, grad_norms=grad_norms)
    metrics = engine.train_one_epoch(model, loss, loader, optimizer, optim.Schedule("constant", 100), None,
                                     engine.FitState(), settings, lambda m, step: logged.append((step, m)))
    return metrics, logged


def test_data_wait_is_near_one_when_the_loader_is_the_bottleneck():
    metrics, _ = one_epoch(SlowLoader(batches=5, delay=0.05))
    assert 0.8 < metrics["train/data_wait"] <= 1.0
    fast, _ = one_epoch([(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 5)
    assert fast["train/data_wait"] < metrics["train/data_wait"]


def test_train_error_is_the_share_of_wrong_training_predictions():
    metrics, logged = one_epoch([(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 6)
    assert 0.0 <= metrics["train/error"] <= 1.0
    assert all(TRAIN_ERROR not in m and "train/ce" not in m for _, m in logged)  # not a loss, not summed


def test_grad_norms_only_for_trainable_stages_every_log_every_steps():
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 5
    _, logged = one_epoch(batches, grad_norms=True)
    norms = [(step, {k: v for k, v in m.items() if k.startswith("grad_norm/")}) for step, m in logged]
    assert [step for step, _ in norms] == [2, 4, 5]  # every 2 steps and the epoch's last
    assert all(set(n) == {"grad_norm/body", "grad_norm/head"} and all(v > 0 for v in n.values()) for _, n in norms)
    _, frozen = one_epoch(batches, grad_norms=True, freeze_body=True)
    assert all("grad_norm/body" not in m and "grad_norm/head" in m for _, m in frozen)
    _, off = one_epoch(batches)
    assert not any(k.startswith("grad_norm/") for _, m in off for k in m)


def test_data_wait_note_names_the_remedies():
    note = engine.data_wait_note(0.45, 0)
    assert "45%" in note and "data.num_workers" in note and "data.cache_mb" in note and "data.image_size" in note


def test_a_run_logs_monitoring_metrics(said, task_file, uri: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 2, "log_every": 2}, tracking={"uri": uri, "log_model": False})
    lines = said
    result = runner.run(path, ("finetune.freeze=[stem,layer1]", "train.log_grad_norms=true", "train.threads=1"))
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    assert {k for k in metrics if k.startswith("grad_norm/")} == {f"grad_norm/{s}" for s in
                                                                  ("layer2", "layer3", "layer4", "head")}
    for key in ("train/data_wait", "train/error", "train/throughput"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2]
    assert 0.0 <= metrics["train/data_wait"] < 1.0 and 0.0 <= metrics["train/error"] <= 1.0
    assert run.data.params["threads"] == "1" and run.data.params["train.threads"] == "1"
    assert any("with 1 threads (train.threads=1)" in line for line in lines)


@pytest.mark.parametrize("every", [0.2, 0])
def test_system_metrics_switch(task_file, uri: str, tmp_path: Path, monkeypatch, every):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1}, tracking={"uri": uri, "log_model": False, "system_metrics_every": every})
    result = runner.run(path, ())
    logged = {k for k in MlflowClient(uri).get_run(result.run_id).data.metrics if k.startswith("system/")}
    assert ("system/cpu_utilization_percentage" in logged and "system/system_memory_usage_megabytes" in logged) \
        if every else not logged
