"""Parameter and GFLOP counts against the published ImageNet figures, and compare's pieces on hand-made runs."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import backbones, compare, profile, tracking
from pipeline.cli import main
from pipeline.tasks.classification.task import Classifier

# torchvision's model cards (ImageNet-1k classifiers, 1000 classes)
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# torchvision's "GFLOPS" at 224 px, which are multiply-accumulates
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet50": 4.09}


def imagenet_classifier(name: str) -> Classifier:
    return Classifier(backbones.build(name, "none"), num_classes=1000)


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_parameter_counts_match_torchvision(name: str):
    assert profile.num_params(imagenet_classifier(name)) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", PUBLISHED_GMACS)
def test_gflops_at_224_match_the_published_multiply_accumulates(name: str):
    assert profile.gflops(imagenet_classifier(name), 224) == pytest.approx(PUBLISHED_GMACS[name], abs=0.01)


def test_counting_gflops_leaves_the_model_as_it_was():
    model = imagenet_classifier("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = profile.gflops(model, 32)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert small == pytest.approx(profile.gflops(model, 64) / 4, rel=0.02)  # convolutions scale with the pixels


def test_pareto_front_keeps_the_points_nothing_beats():
    # (cost, value): the 2nd is beaten by the 1st (cheaper, better); the 4th ties the 3rd's cost with a lower value
    points = [(1.0, 0.70), (2.0, 0.65), (3.0, 0.80), (3.0, 0.75), (8.0, 0.81), (9.0, 0.60)]
    assert compare.pareto_front(points) == [0, 2, 4]
    assert compare.pareto_front([]) == []


def test_metric_is_read_at_the_best_epoch():
    curve = [(1, 0.5), (2, 0.9), (3, 0.7)]
    assert compare.at_best_epoch(curve, 2.0) == 0.9
    assert compare.at_best_epoch(curve, None) == 0.7  # no best epoch logged: the last value
    assert compare.at_best_epoch([], 1.0) is None


@pytest.fixture
def store(tmp_path: Path, empty_store: Path, monkeypatch) -> str:
    """A store with two finished runs logged by hand (no training): resnet50 first, to check the sorting."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name, depth, top1, gflops in (("resnet50", 50, 0.9, 4.09), ("resnet18", 18, 0.8, 1.81)):
        tags = {"task": "classification", "backbone": name, "depth": str(depth), "num_params": "1000",
                "gflops": str(gflops)}
        with tracking.Tracker.start(uri, "handmade", run_name=name, params={}, tags=tags) as run:
            for epoch, value in ((1, top1 - 0.1), (2, top1)):
                run.log_metrics({"val/top1": value, "val/loss": 1 - value, "train/throughput": 100.0}, epoch)
            run.log_metrics({"best/top1": top1, "best/epoch": 2}, 2)
    return uri


def test_compare_table_from_runs(store: str, tmp_path: Path):
    result = compare.run("handmade", uri=store, metric="val/loss", out=tmp_path / "plots", say=lambda *_: None)
    assert [r.backbone for r in result.rows] == ["resnet18", "resnet50"]
    assert [r.value for r in result.rows] == pytest.approx([0.2, 0.1])
    assert result.logged_to is None  # no sweep: nowhere to log
    assert all(p.stat().st_size > 0 for p in result.files)


def test_compare_by_a_tag_labels_rows_and_keeps_groups_apart(store: str, tmp_path: Path):
    """Transfer: the same backbone from a pretrained run and from random init, told apart by weights.source."""
    for source, top1 in (("runs:/abc", 0.95), ("none", 0.6)):
        tags = {"task": "classification", "backbone": "resnet18", "depth": "18", "weights.source": source}
        with tracking.Tracker.start(store, "transfer", run_name=source, params={}, tags=tags) as run:
            run.log_metrics({"val/top1": top1, "best/epoch": 1}, 1)
    lines = []
    result = compare.run("transfer", uri=store, by="weights.source", out=tmp_path / "plots", say=lines.append)
    assert sorted((r.group, r.value) for r in result.rows) == [("none", 0.6), ("runs:/abc", 0.95)]
    header, *body = lines[0].splitlines()
    assert header.split()[:2] == ["backbone", "weights.source"]
    assert sorted(line.split()[1] for line in body) == ["none", "runs:/abc"]
    with (tmp_path / "plots" / "runs.csv").open() as f:
        assert sorted(row["weights.source"] for row in csv.DictReader(f)) == ["none", "runs:/abc"]
    # one line per group in the depth plot: two single-point lines, not one line joining them
    figure = compare._vs_depth(result.rows, "val/top1")
    assert sorted(len(line.get_xdata()) for line in figure.axes[0].get_lines()) == [1, 1]
    result = CliRunner().invoke(main, ["compare", "transfer", "--by", "weights.source", "--uri", store])
    assert result.exit_code == 0 and "runs:/abc" in result.output, result.output


@pytest.mark.parametrize("args, expected", [
    (("nosuch",), "experiment 'nosuch' is not in tracking store"),
    (("handmade", "--metric", "val/nosuch"), "--metric val/nosuch: no run of 'handmade' logged it"),
])
def test_compare_errors_are_one_line(store: str, args, expected):
    result = CliRunner().invoke(main, ["compare", *args, "--uri", store])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output


def test_ui_starts_mlflow_ui_on_the_configured_store(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(main, ["ui", "--port", "5055"])
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                      "--port", "5055"]]
    result = CliRunner().invoke(main, ["ui", "--uri", "http://127.0.0.1:5000"])
    assert result.exit_code == 1 and "serves the UI itself" in result.output
