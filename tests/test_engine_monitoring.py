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
    """train/error is the share of the epoch's training images the model got wrong as it saw them: counted per image
    over batches of different sizes (not a mean of the batches' shares), and a loss term for nobody to sum."""
    model, groups, loss = tiny_fit_parts()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator))
               for n in (2, 7, 3, 6)]
    wrong, images = [], []

    def counting(m, batch):
        x, y = batch
        logits = m(x)
        wrong.append(int((logits.argmax(1) != y).sum()))  # the model's answer at this step, before it steps
        images.append(len(y))
        return loss(m, batch)

    optimizer = torch.optim.SGD(groups, lr=0.1)
    logged = []
    settings = engine.StepSettings(device=torch.device("cpu"), precision="fp32", channels_last=False, log_every=2)
    metrics = engine.train_one_epoch(model, counting, batches, optimizer, optim.Schedule("constant", 100), None,
                                     engine.FitState(), settings, lambda m, step: logged.append((step, m)))
    assert images == [2, 7, 3, 6] and 0 < sum(wrong) < sum(images)  # some right, some wrong: the share tells
    assert metrics["train/error"] == pytest.approx(sum(wrong) / sum(images), rel=1e-6)
    per_batch = sum(w / n for w, n in zip(wrong, images)) / len(images)
    assert metrics["train/error"] != pytest.approx(per_batch, rel=1e-6)  # the batches' mean would differ here
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


def test_a_run_logs_monitoring_metrics(trained_runs):
    """The session's classification run (tests/shared_runs.py): the stem frozen, train.log_grad_norms, one thread."""
    trained = trained_runs("classification")
    client = MlflowClient(trained.uri)
    run = client.get_run(trained.run_id)
    metrics = run.data.metrics
    assert run.data.params["finetune.freeze"] == "['stem']" and run.data.params["train.log_grad_norms"] == "True"
    assert {k for k in metrics if k.startswith("grad_norm/")} == {f"grad_norm/{s}" for s in
                                                                  ("layer1", "layer2", "layer3", "layer4", "head")}
    epochs = list(range(1, int(run.data.params["train.epochs"]) + 1))
    for key in ("train/data_wait", "train/error", "train/throughput"):
        assert [m.step for m in client.get_metric_history(trained.run_id, key)] == epochs
    assert 0.0 <= metrics["train/data_wait"] < 1.0
    assert run.data.params["threads"] == "1" and run.data.params["train.threads"] == "1"
    assert any("with 1 threads (train.threads=1)" in line for line in trained.said)


@pytest.mark.e2e
@pytest.mark.parametrize("every", [0.2, 0])
def test_system_metrics_switch(task_file, uri: str, tmp_path: Path, monkeypatch, every):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1}, tracking={"uri": uri, "log_model": False, "system_metrics_every": every})
    result = runner.run(path, ())
    logged = {k for k in MlflowClient(uri).get_run(result.run_id).data.metrics if k.startswith("system/")}
    assert ("system/cpu_utilization_percentage" in logged and "system/system_memory_usage_megabytes" in logged) \
        if every else not logged
