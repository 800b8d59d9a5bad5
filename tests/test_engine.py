"""Engine pieces: schedules, precision choice, checkpoints written atomically, RNG state round trips."""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.platform import devices
from pipeline.train import checkpoint, engine, optim


def test_warmup_then_cosine():
    s = optim.Schedule(kind="cosine", total_steps=110, warmup_steps=10, min_ratio=0.0)
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.5)
    assert s.factor(110) == pytest.approx(0.0, abs=1e-9)
    factors = [s.factor(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_cosine_floor_step_poly_constant():
    assert optim.Schedule("cosine", 100, min_ratio=0.1).factor(100) == pytest.approx(0.1)
    step = optim.make_schedule("step", epochs=30, steps_per_epoch=10, warmup_epochs=0, min_ratio=0,
                                milestones_epochs=[10, 20], gamma=0.1, power=0.9)
    assert [step.factor(i) for i in (0, 99, 100, 199, 200)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    poly = optim.Schedule("poly", 100, power=0.9)
    assert poly.factor(50) == pytest.approx(0.5 ** 0.9)
    assert optim.Schedule("constant", 100).factor(77) == 1.0


def test_schedule_scales_each_group_from_its_base_lr():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "base_lr": 0.1, "lr": 0.1}, {"params": [p2], "base_lr": 0.01, "lr": 0.01}])
    optim.Schedule("cosine", 100).apply(opt, 50)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UserError, match="fp16 is for CUDA"):
        devices.resolve_precision("fp16", cpu)


def test_cuda_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        devices.resolve_device("cuda:0")


def test_to_device_makes_images_channels_last():
    batch = (torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), {"boxes": torch.zeros(0, 4)})
    moved = devices.to_device(batch, torch.device("cpu"), channels_last=True)
    assert moved[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved[1], batch[1]) and moved[2]["boxes"].shape == (0, 4)


def test_checkpoint_is_atomic(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_or_missing_checkpoint(tmp_path: Path):
    path = tmp_path / "last.pt"
    checkpoint.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="not found; run without --resume"):
        checkpoint.load(tmp_path / "none.pt")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save({"rng": checkpoint.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_nonfinite_loss_stops_with_a_clear_message():
    model = torch.nn.Linear(2, 1)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params, "lr": 0.1, "base_lr": 0.1}])
    loader = [(torch.full((2, 2), math.nan), torch.zeros(2))] * 4
    settings = engine.StepSettings(device=torch.device("cpu"), precision="fp32", max_nonfinite=3)
    before = [p.detach().clone() for p in params]
    with pytest.raises(UserError, match="loss was not finite for 3 consecutive steps"):
        engine.train_one_epoch(model, lambda m, b: {"l": m(b[0]).sum()}, loader, opt, optim.Schedule("constant", 4),
                               None, engine.FitState(), settings, log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # no NaN reached the weights


def test_gradient_accumulation_matches_a_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def trained(accum: int, batch: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD([{"params": list(model.parameters()), "lr": 0.1, "base_lr": 0.1}])
        loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 8, batch)]
        settings = engine.StepSettings(device=torch.device("cpu"), precision="fp32", accum_steps=accum)
        engine.train_one_epoch(model, lambda m, b: {"mse": ((m(b[0]) - b[1]) ** 2).mean()}, loader, opt,
                               optim.Schedule("constant", 1), None, engine.FitState(), settings, log=lambda *a: None)
        return model.weight.detach()

    assert torch.allclose(trained(accum=4, batch=2), trained(accum=1, batch=8), atol=1e-6)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(said, tmp_path: Path):
    for epoch in (1, 2):
        checkpoint.save({"epoch": epoch, "w": torch.randn(1000)}, tmp_path / checkpoint.LAST, keep_previous=True)
    assert checkpoint.load_resumable(tmp_path)["epoch"] == 2
    last = tmp_path / checkpoint.LAST
    last.write_bytes(last.read_bytes()[:300])  # e.g. a disk that filled up under another writer
    assert checkpoint.load_resumable(tmp_path)["epoch"] == 1
    assert "resuming from the previous checkpoint" in said[0]
    last.unlink()
    assert checkpoint.load_resumable(tmp_path)["epoch"] == 1
    (tmp_path / checkpoint.PREVIOUS).unlink()
    with pytest.raises(UserError, match="not found; run without --resume"):
        checkpoint.load_resumable(tmp_path)


class Scripted:
    """An evaluator that reports the next of a list of values, whatever the model does."""

    def __init__(self, values: list[float]) -> None:
        self.value = values.pop(0)

    def update(self, outputs, batch) -> None:
        pass

    def compute(self) -> dict:
        return {"val/mae": self.value}


@pytest.mark.parametrize("goal, values, best_epoch, epochs_run", [
    ("min", [0.5, 0.3, 0.4, 0.35, 0.1], 2, 4),  # lower is better: epoch 2, then two worse epochs stop it
    ("max", [0.5, 0.3, 0.4, 0.35, 0.1], 1, 3),  # the same numbers read as accuracy: epoch 1
    ("min", [float("nan"), 0.9, float("nan"), 1.0, 2.0], 2, 4),  # NaN never holds the best checkpoint
])
def test_the_primary_metric_s_goal_picks_the_best_epoch_and_stops(goal, values, best_epoch, epochs_run, tmp_path):
    from pipeline.tasks.metric import Metric
    from pipeline.train import finetune

    model = torch.nn.Linear(2, 1)
    loader = [(torch.randn(4, 2), torch.zeros(4, 1))]
    plan = finetune.Plan(parts=(), backbone_stages=(), frozen=frozenset(), unfreeze={}, bn="train", lr_mult={},
                         no_decay_norm_bias=False)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "lr": 0.01, "base_lr": 0.01}])
    f = engine.Fit(model=model, loss=lambda m, b: {"mse": ((m(b[0]) - b[1]) ** 2).mean()},
                   predict=lambda m, b: m(b[0]), make_evaluator=lambda: Scripted(values),
                   primary=Metric("val/mae", goal), merge_evaluators=False, train_loader=loader, val_loader=loader,
                   optimizer=opt, schedule=optim.Schedule("constant", 5), plan=plan, base_lr=0.01, weight_decay=0.0,
                   settings=engine.StepSettings(device=torch.device("cpu"), precision="fp32"), epochs=5,
                   output_dir=tmp_path, patience=2)
    state = engine.fit(f, engine.FitState())
    assert (state.best_epoch, state.epoch) == (best_epoch, epochs_run)
    assert checkpoint.load(tmp_path / checkpoint.BEST)["fit"]["best_epoch"] == best_epoch


def test_metric_goal_and_best_key():
    from pipeline.tasks.metric import Metric

    top1, loss = Metric("val/top1"), Metric("val/loss", goal="min")
    assert top1.better(0.9, 0.8) and not top1.better(0.8, 0.9) and top1.better(0.1, None)
    assert loss.better(0.8, 0.9) and not loss.better(0.9, 0.8)
    assert not loss.better(float("nan"), 0.9) and loss.better(0.9, float("nan"))
    assert loss.best([0.5, float("nan"), 0.2, 0.4]) == 0.2 and top1.best([0.5, 0.2]) == 0.5 and top1.best([]) is None
    assert (top1.best_key, loss.best_key) == ("best/top1", "best/loss")
    with pytest.raises(ValueError, match="goal"):
        Metric("val/x", goal="up")
