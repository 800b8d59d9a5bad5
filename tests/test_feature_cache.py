"""Linear probing on cached backbone features trains the head as it would on images."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.train import checkpoint, runner

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


def test_cache_refuses_random_transforms_unless_views_are_asked(task_file, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_tf = [{"name": "RandomResizedCrop", "size": [32, 32], "scale": [0.5, 1.0]}]
    path = task_file(data={"train_transforms": random_tf}, train={"epochs": 1},
                     finetune={"freeze": "all", "cache_features": True})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "finetune.cache_features: data.train_transforms are random" in result.output
    views = runner.run(path, ("finetune.cached_views=2",))
    assert views.best >= 0.0
