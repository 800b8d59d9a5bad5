"""The learning-rate range test: its exponential schedule, the stage multipliers' ratios, the stop at divergence, the
suggestion's rules, a model left exactly as it was (weights, BatchNorm statistics, mode, RNG), `pipeline lr-find` for
every task, and train.lr=auto training exactly as a run given the suggested lr would."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

from pipeline.cli import main
from pipeline.tasks import registry
from pipeline.train import builders, checkpoint, engine, lr_find, range_test, runner

SETTINGS = engine.StepSettings(device=torch.device("cpu"), precision="fp32", channels_last=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _batches(n: int = 7) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n * 16, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]


def _mse(model, batch):
    return {"mse": ((model(batch[0]) - batch[1]) ** 2).mean()}


def _groups(model: nn.Module) -> list[dict]:
    # as finetune.groups_until builds them for a base lr of 1: each group's base_lr is its stage's multiplier
    return [{"params": list(model[0].parameters()), "lr": 0.5, "base_lr": 0.5, "name": "early"},
            {"params": list(model[3].parameters()) + list(model[1].parameters()), "lr": 1.0, "base_lr": 1.0,
             "name": "head"}]


def test_the_lr_ramps_exponentially_and_every_group_keeps_its_multiplier():
    model, seen = _net(), []
    made = []

    def build(groups):
        made.append(torch.optim.SGD(groups, lr=1.0))
        return made[-1]

    def loss(m, batch):  # what each step trains with: the groups' lrs when the batch's loss is taken
        seen.append([g["lr"] for g in made[0].param_groups])
        return _mse(m, batch)

    curve = range_test.measure(model, loss, _batches(), _groups(model), build, SETTINGS, False, 1e-6, 1e-3, 12)
    planned = [1e-6 * 1e3 ** (i / 11) for i in range(12)]
    assert curve.lrs == pytest.approx(planned) and curve.planned == 12  # 12 steps over 7 batches: data repeats
    assert [early for early, _ in seen] == pytest.approx([0.5 * lr for lr in planned])
    assert [head for _, head in seen] == pytest.approx(planned)
    assert curve.stopped == "reached lr_find.end_lr"


def test_the_model_is_left_exactly_as_it_was():
    model = _net()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    curve = range_test.measure(model, _mse, _batches(), _groups(model), lambda g: torch.optim.AdamW(g), SETTINGS,
                               False, 1e-5, 1.0, 20)
    assert len(curve.lrs) >= 5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert before["1.num_batches_tracked"].item() == 0 and not model.training
    assert torch.equal(torch.rand(3), expected)  # the RNG continues as if no test had run
    assert all(p.grad is None for p in model.parameters())


def test_the_test_stops_where_the_loss_diverges():
    model = _net()
    curve = range_test.measure(model, _mse, _batches(), _groups(model), lambda g: torch.optim.SGD(g, lr=1.0),
                               SETTINGS, False, 1e-4, 1e4, 100)
    assert 5 <= len(curve.lrs) < 100 and curve.lrs[-1] < 1e4
    assert curve.stopped.startswith(f"stopped at lr {curve.lrs[-1]:.2e}" if "passed" in curve.stopped else "stopped at")
    assert curve.suggestion < curve.lrs[-1] / 10


def _curve(shape, noise: float = 0.0, steps: int = 100, suggest: str = "steepest") -> range_test.Curve:
    lrs = range_test.ramp(1e-7, 10.0, steps)
    rng = np.random.default_rng(0)
    losses = [shape(math.log10(lr)) * (1 + noise * rng.standard_normal()) for lr in lrs]
    return range_test.Curve(lrs, losses, steps, "reached lr_find.end_lr", suggest)


def _valley(x: float) -> float:  # flat at 2 up to 1e-4, falling to 1 at 1e-2, flat to 1e-1, then climbing fast
    return 2.0 if x < -4 else (2.0 - (x + 4) / 2 if x < -2 else (1.0 if x < -1 else 1 + 20 * (x + 1)))


def test_a_falling_loss_suggests_its_steepest_descent_or_a_tenth_of_its_edge():
    valley = _curve(_valley)
    assert valley.falls and 1e-4 <= valley.suggestion <= 1e-2  # where it falls
    assert valley.suggestion == valley.lrs[valley.steepest] and "where the smoothed loss fell fastest" in valley.line()
    cautious = _curve(_valley, suggest="minimum")
    # a tenth of the valley's far end (1e-1), a little lower: the smoothing's window (a third of a decade either side)
    # sees the climb before it starts
    assert 3e-3 < cautious.suggestion < 1.01e-2 and "the largest lr whose smoothed loss" in cautious.line()


def test_a_loss_that_never_falls_suggests_the_edge_not_a_noise_dip():
    # a randomly initialised net: the loss only wobbles until it climbs past 1e-3
    flat = _curve(lambda x: 2.3 if x < -3 else 2.3 + 3 * (x + 3), noise=0.005)
    assert not flat.falls and 0.5e-3 < flat.suggestion < 1.5e-3
    assert "the loss never fell 10%" in flat.how()
    cautious = _curve(lambda x: 2.3 if x < -3 else 2.3 + 3 * (x + 3), noise=0.005, suggest="minimum")
    assert cautious.suggestion == pytest.approx(flat.suggestion / 10)


def _task_file(name: str, folder: Path, uri: str, **train) -> Path:
    task = registry.get(name)
    path = folder / "tasks" / f"{name}_tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"task": name, **task.tiny(folder / "data"),
                                    "train": {"epochs": 1, "output_dir": str(folder / "out"), **train},
                                    "tracking": {"uri": uri, "log_model": False}}))
    return path


@pytest.mark.parametrize("name", sorted(registry.TASKS))
def test_every_task_measures_from_its_start_and_is_left_as_it_was(name, tmp_path, uri):
    setup = runner.prepare(_task_file(name, tmp_path, uri), ("lr_find.steps=5",))
    data = builders.build_data(setup)
    model = builders.build_model(setup, data.info)
    plan = builders.plan_finetune(setup, model)
    model = builders.place_model(setup, model, plan)
    train, _ = builders.make_loaders(setup, data, model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = lr_find.lr_range_test(setup, model, plan, train)
    assert len(curve.lrs) == 5 and curve.suggestion > 0 and all(math.isfinite(x) for x in curve.losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.e2e
def test_lr_find_logs_the_curve_and_suggestion_to_a_run_of_its_own(task_file, tmp_path, monkeypatch, uri, said):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["lr-find", str(task_file()), "lr_find.steps=20",
                                       "finetune.lr_mult={layer4: 0.5}"])
    assert result.exit_code == 0, result.output
    line = next(x for x in said if x.startswith("lr-find: suggested train.lr="))
    suggested = float(line.split("=")[1].split(":")[0])
    assert float(line.split("; with lr_mult: layer4 ")[1]) == pytest.approx(suggested * 0.5, rel=1e-2)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name.startswith("lr-find-")
    run = runs[0]
    assert float(run.data.params["lr_find.suggested_lr"]) == pytest.approx(suggested, rel=1e-2)
    assert run.data.tags["lr_find"] == "true" and "backbone" not in run.data.tags  # compare leaves it out
    assert {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")} == {"lr_find/curve.png",
                                                                                   "lr_find/curve.csv"}
    taken = int(line.split(" of 20 steps")[0].rsplit("(", 1)[1])
    assert 5 <= taken <= 20 and len(client.get_metric_history(run.info.run_id, "lr_find/loss")) == taken
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.e2e
def test_auto_lr_trains_exactly_as_the_suggested_lr_given_by_hand(task_file, tmp_path, monkeypatch, uri, said):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1, "precision": "fp32", "lr": "auto", "log_every": 1},
                     finetune={"lr_mult": {"layer4": 0.5}}, lr_find={"steps": 20})
    auto = runner.run(path, (f"train.output_dir={tmp_path / 'auto'}",))
    lr = checkpoint.load(tmp_path / "auto" / checkpoint.LAST)["config"]["train"]["lr"]
    assert isinstance(lr, float)
    assert any(f"train.lr: auto: the range test suggested train.lr={lr:.2e}" in line for line in said)
    given = runner.run(path, (f"train.output_dir={tmp_path / 'given'}", f"train.lr={lr!r}"))
    client = MlflowClient(uri)
    assert client.get_run(auto.run_id).data.params["lr_find.suggested_lr"] == f"{lr:.3e}"
    losses = [[m.value for m in client.get_metric_history(r.run_id, "train/loss")] for r in (auto, given)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]  # the range test left no trace on the run that follows
    a = checkpoint.load(tmp_path / "auto" / checkpoint.LAST)["model"]
    b = checkpoint.load(tmp_path / "given" / checkpoint.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    head = client.get_metric_history(auto.run_id, "lr/head")[0].value
    assert client.get_metric_history(auto.run_id, "lr/layer4")[0].value == pytest.approx(0.5 * head)
