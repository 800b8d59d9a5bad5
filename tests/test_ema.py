"""train.ema: the moving average follows the weights and BatchNorm's statistics as computed by hand, and it is the model
that is evaluated, kept as best.pt and resumed."""
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline.train import checkpoint, runner
from pipeline.train.ema import EMA


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def test_the_average_moves_as_computed_by_hand_buffers_included():
    model = _net()
    _set(model, 1.0)
    ema = EMA(model, decay=0.9)
    hand = 1.0
    for n, now in enumerate([3.0, -2.0, 5.0]):
        _set(model, now)
        model[1].num_batches_tracked.fill_(n + 7)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # the decay's warm-up: 0.1, 0.18..., then at most 0.9
        hand = d * hand + (1 - d) * now
        state = ema.module.state_dict()
        for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
            assert torch.allclose(state[name], torch.full_like(state[name], hand)), name
        assert state["1.num_batches_tracked"].item() == n + 7  # counts are copied, not averaged
    assert ema.updates == 3 and ema.decay_at(100) == 0.9
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_the_average_resumes_where_it_stopped():
    model = _net()
    ema = EMA(model, decay=0.99)
    ema.update(model)
    ema.update(model)
    again = EMA(_net(), decay=0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(again.module.state_dict().values(), ema.module.state_dict().values()))


@pytest.mark.e2e
def test_the_average_is_evaluated_kept_as_best_and_resumed(task_file, tmp_path, monkeypatch, said, uri):
    monkeypatch.chdir(tmp_path)
    path = task_file(train={"epochs": 1, "ema": 0.9, "precision": "fp32"})
    result = runner.run(path)
    assert any("train.ema=0.9: the moving average of the weights" in line for line in said)
    assert MlflowClient(uri).get_run(result.run_id).data.tags["evaluated_weights"] == "ema 0.9"
    last = checkpoint.load(tmp_path / "out" / checkpoint.LAST)
    best = checkpoint.load(tmp_path / "out" / checkpoint.BEST)
    assert last["ema"]["updates"] == last["fit"]["step"] == 3  # one update per optimizer step
    averaged = last["ema"]["model"]
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)  # best.pt holds the average
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged if averaged[k].is_floating_point())
    # the average scored the run: evaluating best.pt's weights again gives the logged score
    assert MlflowClient(uri).get_run(result.run_id).data.metrics["val/top1"] == pytest.approx(result.best)
    resumed = runner.run(path, ("train.epochs=2",), resume=True)  # the average continues from the checkpoint's
    more = checkpoint.load(tmp_path / "out" / checkpoint.LAST)
    assert more["ema"]["updates"] == more["fit"]["step"] == 6 and resumed.run_id == result.run_id


@pytest.mark.parametrize("decay", [1.5, 1.0, 0.0])
def test_a_decay_outside_zero_and_one_is_refused(decay):
    from pipeline import config
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="train.ema: .* the average's decay must lie between 0 and 1"):
        config.validate({"task": "face", "train": {"ema": decay}})
