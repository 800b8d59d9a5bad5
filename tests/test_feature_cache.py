"""Linear probing on cached backbone features trains the head as it would on images."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.models import backbones
from pipeline.tasks import registry, saved
from pipeline.train import checkpoint, engine, runner

pytestmark = pytest.mark.e2e

DETERMINISTIC = [{"name": "Resize", "height": 32, "width": 32}]


def test_cached_features_match_uncached_training(task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = task_file(data={"train_transforms": DETERMINISTIC},
                     train={"epochs": 2, "lr": 1e-2, "precision": "fp32", "warmup_epochs": 0},
                     finetune={"freeze": "all", "bn": "frozen"})
    quiet = dict()
    plain = runner.run(path, (f"train.output_dir={tmp_path / 'plain'}",), **quiet)
    cached = runner.run(path, (f"train.output_dir={tmp_path / 'cached'}", "finetune.cache_features=true"), **quiet)
    a = checkpoint.load(plain.output_dir / checkpoint.LAST)["model"]
    b = checkpoint.load(cached.output_dir / checkpoint.LAST)["model"]
    assert torch.allclose(a["head.1.weight"], b["head.1.weight"], atol=1e-4)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))  # frozen, and the same
    assert cached.best == pytest.approx(plain.best, abs=0.05)


def _top1_of(best: Path, path: Path, overrides: tuple[str, ...]) -> float:
    """val/top1 of a best checkpoint's model, evaluated on the images themselves (no cache), as the run would."""
    cfg = config.load(path, overrides)
    task = registry.get(cfg.task)
    mean, std = backbones.pretrained_mean_std(cfg.model.backbone.name)
    data = task.build_data(cfg.data, mean=cfg.data.mean or mean, std=cfg.data.std or std, seed=cfg.seed)
    model = saved.read(checkpoint.load(best), str(best)).model
    loader = torch.utils.data.DataLoader(data.val, batch_size=16)
    settings = engine.StepSettings(device=torch.device("cpu"), precision="fp32")
    return engine.evaluate(model, task.predict, task.make_evaluator(data.info), loader, settings)["val/top1"]


def test_cache_refuses_random_transforms_unless_views_are_asked(said, task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_tf = [{"name": "RandomResizedCrop", "size": [32, 32], "scale": [0.5, 1.0]}]
    path = task_file(data={"train_transforms": random_tf}, train={"epochs": 1, "precision": "fp32"},
                     finetune={"freeze": "all", "cache_features": True})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "finetune.cache_features: data.train_transforms are random" in result.output
    views = runner.run(path, ("finetune.cached_views=2",))
    assert any("cached backbone features of 120 train / 24 val images" in line for line in said)  # 60 images x 2
    # the head trained on the cached views scores, on the images themselves, what the run reported
    assert views.best == pytest.approx(_top1_of(views.output_dir / checkpoint.BEST, path, ()), abs=1e-9)
