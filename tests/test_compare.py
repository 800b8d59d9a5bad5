"""Parameter and GFLOP counts against the published ImageNet figures, and compare's pieces on hand-made runs."""
import csv
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg

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


def _training_run(uri: str, experiment: str, name: str, depth: int, top1: float, epochs: int,
                  parent: str | None = None) -> str:
    tags = {"task": "classification", "backbone": name, "depth": str(depth), "gflops": str(depth / 10)}
    with tracking.Tracker.start(uri, experiment, run_name=name, params={"train.epochs": str(epochs)}, tags=tags,
                                parent_run_id=parent) as run:
        run.log_metrics({"val/top1": top1, "best/epoch": 1}, 1)
    time.sleep(0.01)  # start times in milliseconds: keep the order unambiguous
    return run.run_id


def _sweep(uri: str, experiment: str, epochs: int, top1: dict[str, float]) -> str:
    with tracking.Tracker.start(uri, experiment, run_name=f"sweep-{epochs}", params={},
                                tags={"pipeline.sweep": "parent", "task": "classification"}) as parent:
        for name, value in top1.items():
            _training_run(uri, experiment, name, int(name.removeprefix("resnet")), value, epochs, parent.run_id)
    return parent.run_id


@pytest.fixture
def sweeps(store: str) -> dict[str, str]:
    """The issue's experiment: a 20-epoch demo run, then a 2-epoch sweep, then a 3-epoch one, each of two depths."""
    demo = _training_run(store, "demo", "resnet18", 18, 0.96, epochs=20)
    first = _sweep(store, "demo", 2, {"resnet18": 0.40, "resnet34": 0.45})
    latest = _sweep(store, "demo", 3, {"resnet18": 0.50, "resnet34": 0.55})
    return {"demo": demo, "first": first, "latest": latest}


def test_compare_defaults_to_the_latest_sweep(store: str, sweeps: dict[str, str], tmp_path: Path):
    said = []
    result = compare.run("demo", uri=store, out=tmp_path / "plots", say=said.append)
    assert {r.parent_run_id for r in result.rows} == {sweeps["latest"]}
    assert [(r.backbone, r.epochs, r.value) for r in result.rows] == [("resnet18", 3, 0.5), ("resnet34", 3, 0.55)]
    assert said[0].startswith(f"latest sweep {sweeps['latest'][:8]} (sweep-3): 2 runs; 3 more finished runs")
    header = said[1].splitlines()[0].split()
    assert "epochs" in header and "sweep" not in header  # one sweep: no sweep column needed
    assert result.logged_to == sweeps["latest"]
    assert {p.name for p in result.files} == {*compare.PLOTS, "runs.csv"} and "time_vs_depth.png" in compare.PLOTS


@pytest.mark.parametrize("spelling", ["prefix", "folder name", "whole id"])
def test_compare_resolves_a_short_parent_id(store: str, sweeps: dict[str, str], spelling: str):
    parent = sweeps["first"]
    given = {"prefix": parent[:8], "folder name": f"sweep-{parent[:8]}", "whole id": parent}[spelling]
    result = CliRunner().invoke(main, ["compare", "demo", "--parent", given, "--uri", store])
    assert result.exit_code == 0, result.output
    assert "0.4000" in result.output and "0.4500" in result.output and "0.5000" not in result.output


def test_compare_refuses_an_ambiguous_prefix_and_lists_the_candidates(store: str, sweeps: dict[str, str]):
    ids = list(sweeps.values())
    while True:  # 17 runs share a first hex digit for sure; usually a few more runs do
        firsts = [i[0] for i in ids]
        shared = next((c for c in firsts if firsts.count(c) > 1), None)
        if shared:
            break
        ids.append(_training_run(store, "demo", "resnet50", 50, 0.6, epochs=2))
    result = CliRunner().invoke(main, ["compare", "demo", "--parent", shared, "--uri", store])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is ambiguous" in errors[0], result.output
    all_ids = [r.run_id for r in tracking.search_runs(store, "demo")]
    assert all(i in errors[0] for i in all_ids if i.startswith(shared))
    result = CliRunner().invoke(main, ["compare", "demo", "--parent", "zz", "--uri", store])
    assert result.exit_code == 1 and "no run of 'demo' has an id starting with 'zz'" in result.output
    assert sweeps["latest"][:8] in result.output  # the sweeps there are named


def test_compare_never_joins_runs_of_different_sweeps_or_epochs(store: str, sweeps: dict[str, str], tmp_path: Path):
    said = []
    result = compare.run("demo", uri=store, every=True, say=said.append)
    assert len(result.rows) == 5
    header, *body = said[0].splitlines()
    assert header.split()[-3:] == ["sweep", "run", "id"]
    assert sorted(line.split()[-2] for line in body) == sorted([sweeps["first"][:8]] * 2 + [sweeps["latest"][:8]] * 2
                                                               + ["-"])
    for figure in (compare._vs_depth(result.rows, "val/top1"), compare._time_vs_depth(result.rows)):
        ax = figure.axes[0]
        joined = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert joined == {f"sweep {sweeps['first'][:8]}, 2 epochs": [18, 34],
                          f"sweep {sweeps['latest'][:8]}, 3 epochs": [18, 34],
                          f"run {sweeps['demo'][:8]}, 20 epochs": [18]}  # the demo run is a point of its own
        FigureCanvasAgg(figure).draw()  # the legend sits right of the axes, so it covers no point
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    # fractions on 0..1: 0.40 and 0.55 do not fill the plot's height
    assert compare._vs_depth(result.rows, "val/top1").axes[0].get_ylim() == pytest.approx((0, 1.04))


def test_compare_keeps_repeated_depths_of_one_sweep_apart(store: str):
    """A sweep over backbone and learning rate: a line through both lr values of one depth would zigzag."""
    with tracking.Tracker.start(store, "lr", run_name="sweep", params={}, tags={}) as parent:
        for name, top1 in (("resnet18", 0.5), ("resnet18", 0.7), ("resnet34", 0.6)):
            _training_run(store, "lr", name, int(name[6:]), top1, epochs=2, parent=parent.run_id)
    result = compare.run("lr", uri=store, say=lambda *_: None)
    (line,) = compare._vs_depth(result.rows, "val/top1").axes[0].get_lines()
    assert line.get_linestyle() == "None" and "not joined: repeated depths" in line.get_label()


@pytest.mark.parametrize("args, expected", [
    (("nosuch",), "experiment 'nosuch' is not in tracking store"),
    (("handmade", "--metric", "val/nosuch"), "--metric val/nosuch: no run of 'handmade' logged it"),
])
def test_compare_errors_are_one_line(store: str, args, expected):
    result = CliRunner().invoke(main, ["compare", *args, "--uri", store])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
