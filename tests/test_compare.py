"""Parameter and GFLOP counts against the published ImageNet figures, and compare's pieces on hand-made runs."""
import csv
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pipeline import tracking
from pipeline.cli import main
from pipeline.models import backbones, profile
from pipeline.study import compare, plots
from pipeline.study.rows import family
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
    assert plots.pareto_front(points) == [0, 2, 4]
    assert plots.pareto_front([]) == []


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
    result = compare.run("handmade", uri=store, metric="val/loss", out=tmp_path / "plots")
    assert [r.backbone for r in result.rows] == ["resnet18", "resnet50"]
    assert [r.value for r in result.rows] == pytest.approx([0.2, 0.1])
    assert result.logged_to is None  # no sweep: nowhere to log
    assert all(p.stat().st_size > 0 for p in result.files)


def test_compare_by_a_tag_labels_rows_and_keeps_groups_apart(said, store: str, tmp_path: Path):
    """Transfer: the same backbone from a pretrained run and from random init, told apart by weights.source."""
    for source, top1 in (("runs:/abc", 0.95), ("none", 0.6)):
        tags = {"task": "classification", "backbone": "resnet18", "depth": "18", "weights.source": source}
        with tracking.Tracker.start(store, "transfer", run_name=source, params={}, tags=tags) as run:
            run.log_metrics({"val/top1": top1, "best/epoch": 1}, 1)
    lines = said
    result = compare.run("transfer", uri=store, by="weights.source", out=tmp_path / "plots")
    assert sorted((r.group, r.value) for r in result.rows) == [("none", 0.6), ("runs:/abc", 0.95)]
    header, *body = lines[0].splitlines()
    assert header.split()[:2] == ["backbone", "weights.source"]
    assert sorted(line.split()[1] for line in body) == ["none", "runs:/abc"]
    with (tmp_path / "plots" / "runs.csv").open() as f:
        assert sorted(row["weights.source"] for row in csv.DictReader(f)) == ["none", "runs:/abc"]
    # one line per group in the depth plot: two single-point lines, not one line joining them
    figure = plots._vs_depth(result.rows, "val/top1")
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


def test_compare_defaults_to_the_latest_sweep(said, store: str, sweeps: dict[str, str], tmp_path: Path):
    result = compare.run("demo", uri=store, out=tmp_path / "plots")
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


def test_compare_never_joins_runs_of_different_sweeps_or_epochs(said, store: str, sweeps: dict[str, str],
                                                                tmp_path: Path):
    result = compare.run("demo", uri=store, every=True)
    assert len(result.rows) == 5
    header, *body = said[0].splitlines()
    assert header.split()[-3:] == ["sweep", "run", "id"]
    assert sorted(line.split()[-2] for line in body) == sorted([sweeps["first"][:8]] * 2 + [sweeps["latest"][:8]] * 2
                                                               + ["-"])
    for figure in (plots._vs_depth(result.rows, "val/top1"), plots._time_vs_depth(result.rows)):
        ax = figure.axes[0]
        joined = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert joined == {f"sweep {sweeps['first'][:8]}, 2 epochs": [18, 34],
                          f"sweep {sweeps['latest'][:8]}, 3 epochs": [18, 34],
                          f"run {sweeps['demo'][:8]}, 20 epochs": [18]}  # the demo run is a point of its own
        FigureCanvasAgg(figure).draw()  # the legend sits right of the axes, so it covers no point
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    # fractions on 0..1: 0.40 and 0.55 do not fill the plot's height
    assert plots._vs_depth(result.rows, "val/top1").axes[0].get_ylim() == pytest.approx((0, 1.04))


def test_compare_keeps_repeated_depths_of_one_sweep_apart(store: str):
    """A sweep over backbone and learning rate: a line through both lr values of one depth would zigzag."""
    with tracking.Tracker.start(store, "lr", run_name="sweep", params={}, tags={}) as parent:
        for name, top1 in (("resnet18", 0.5), ("resnet18", 0.7), ("resnet34", 0.6)):
            _training_run(store, "lr", name, int(name[6:]), top1, epochs=2, parent=parent.run_id)
    result = compare.run("lr", uri=store)
    (line,) = plots._vs_depth(result.rows, "val/top1").axes[0].get_lines()
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


def test_compare_on_a_store_that_does_not_exist_says_so_and_leaves_none(tmp_path: Path):
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(main, ["compare", "quickstart", "--uri", f"sqlite:///{missing}"])
    assert result.exit_code == 1 and not missing.exists()
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no tracking store at {missing} (sqlite:///{missing}): nothing was logged there; run "
                      "from the folder you trained in, or point --uri / MLFLOW_TRACKING_URI at your store"]


# ---------------------------------------------------------------------------------------------------------------------
# The degradation experiment (issue 21): plain and residual CIFAR nets of two depths in one sweep, compared on training
# error at the end of training, on validation top-1, and on the stem's gradient norm logged per optimizer step.

STEPS_PER_EPOCH = 4
# backbone -> (train/error at the last epoch, val/top1 at the best epoch, grad_norm/stem over the last epoch)
DEGRADATION = {"cifar_plain20": (0.10, 0.88, 0.05), "cifar_plain56": (0.20, 0.80, 0.01),
               "cifar_resnet20": (0.08, 0.90, 0.50), "cifar_resnet56": (0.05, 0.92, 0.40)}


def _degradation_run(uri: str, parent: str, name: str, epochs: int = 3) -> str:
    error, top1, grad = DEGRADATION[name]
    depth = int(name.removeprefix(family(name)))
    tags = {"task": "classification", "backbone": name, "depth": str(depth), "gflops": str(depth / 100),
            "num_params": str(depth * 1000)}
    with tracking.Tracker.start(uri, "degradation_shapes", run_name=name, params={"train.epochs": str(epochs)},
                                tags=tags, parent_run_id=parent) as run:
        for epoch in range(1, epochs + 1):
            metrics = {"train/error": error + 0.1 * (epochs - epoch), "train/loss_epoch": 2 * error + epochs - epoch,
                       "val/top1": top1 - (0.1 if epoch == 1 else 0.05 if epoch == 3 else 0.0), "model/depth": depth}
            if "resnet" in name:  # only the residual runs log it: the plain rows show '-'
                metrics["val/loss"] = 1 - top1
            run.log_metrics(metrics, epoch)
        for step in range(1, epochs * STEPS_PER_EPOCH + 1):  # per optimizer step: 10x larger before the last epoch
            last_epoch = step > (epochs - 1) * STEPS_PER_EPOCH
            run.log_metrics({"grad_norm/stem": grad if last_epoch else 10 * grad}, step)
        run.log_metrics({"best/top1": top1, "best/epoch": 2}, epochs)
    time.sleep(0.01)
    return run.run_id


@pytest.fixture
def degradation(store: str) -> str:
    """The issue's sweep: model.backbone.name=cifar_plain20,cifar_plain56,cifar_resnet20,cifar_resnet56."""
    with tracking.Tracker.start(store, "degradation_shapes", run_name="sweep", params={},
                                tags={"pipeline.sweep": "parent", "task": "classification"}) as parent:
        for name in DEGRADATION:
            _degradation_run(store, parent.run_id, name)
    return parent.run_id


@pytest.mark.parametrize("backbone, expected", [
    ("cifar_plain56", "cifar_plain"), ("cifar_resnet20", "cifar_resnet"), ("resnet50", "resnet"),
    ("resnext50_32x4d", "resnext"), ("wide_resnet50_2", "wide_resnet"), ("densenet121", "densenet"),
    ("tinynet", "tinynet"),
])
def test_family_is_the_name_without_its_depth(backbone: str, expected: str):
    assert family(backbone) == expected


def test_plain_and_residual_nets_are_two_lines_and_each_metric_gets_a_column_and_a_plot(said,
        store: str, degradation: str, tmp_path: Path):
    result = compare.run("degradation_shapes", uri=store, metric="train/error,val/top1", at="last",
                         out=tmp_path / "figs")
    assert result.metrics == ["train/error", "val/top1"]
    # sorted by depth within each family, the families apart
    assert [r.backbone for r in result.rows] == ["cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56"]
    joined = {key: [r.backbone for r in members] for key, members in plots.lines(result.rows).items()}
    assert joined == {(degradation, 3, "cifar_plain", ""): ["cifar_plain20", "cifar_plain56"],
                      (degradation, 3, "cifar_resnet", ""): ["cifar_resnet20", "cifar_resnet56"]}
    # the depth plot draws one line per family, labelled with it
    ax = plots._vs_depth(result.rows, "train/error", "last").axes[0]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert drawn == {f"cifar_plain, sweep {degradation[:8]}, 3 epochs": ([20, 56], pytest.approx([0.10, 0.20])),
                     f"cifar_resnet, sweep {degradation[:8]}, 3 epochs": ([20, 56], pytest.approx([0.08, 0.05]))}
    assert ax.get_ylabel() == "train/error (last)"
    # one column per metric, headed by which value it holds
    table = next(line for line in said if line.startswith("backbone"))
    header, *body = table.splitlines()
    assert "train/error (last)" in header and "val/top1 (last)" in header
    assert body[1].split()[:7] == ["cifar_plain56", "56", "3", "56,000", "0.56", "0.2000", "0.7500"]
    # a <metric>_vs_depth.png per metric; the other plots show the first metric
    assert {p.name for p in result.files} == {"train_error_vs_depth.png", "val_top1_vs_depth.png",
                                              "metric_vs_gflops.png", "time_vs_depth.png", "curves.png", "runs.csv"}
    assert all(p.is_file() and p.read_bytes().startswith(b"\x89PNG") for p in result.files if p.suffix == ".png")
    with (tmp_path / "figs" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(row["train/error (last)"]) for row in rows] == pytest.approx([0.10, 0.20, 0.08, 0.05])
    assert result.logged_to == degradation


def test_at_last_takes_the_end_of_training_and_best_the_best_checkpoints_epoch(store: str, degradation: str):
    def values(at: str) -> list[float]:
        result = compare.run("degradation_shapes", uri=store, metric=["val/top1", "train/error"], at=at)
        return [(r.values["val/top1"], r.values["train/error"]) for r in result.rows if r.backbone == "cifar_plain20"]

    # val/top1 is 0.88 at the best epoch (2) and 0.83 at the last (3); train/error is 0.2 at epoch 2, 0.1 at 3
    assert values("best") == [pytest.approx((0.88, 0.20))]
    assert values("last") == [pytest.approx((0.83, 0.10))]


def test_a_metric_logged_per_optimizer_step_reads_as_its_last_epochs_mean(said, store: str, degradation: str,
                                                                         tmp_path: Path):
    # --at best: no best epoch among optimizer steps, the same reading
    result = compare.run("degradation_shapes", uri=store, metric="grad_norm/stem", out=tmp_path / "figs")
    assert {r.backbone: r.value for r in result.rows} == pytest.approx(
        {name: grad for name, (_, _, grad) in DEGRADATION.items()})
    assert all(r.per_step["grad_norm/stem"] for r in result.rows)
    assert "grad_norm/stem (mean of last epoch)" in next(line for line in said if line.startswith("backbone"))
    assert {p.name for p in result.files} >= {"metric_vs_depth.png", "curves.png"}
    # gradient norms are no fractions: 0.01 and 0.5 are drawn up to 0.5, not flat on a 0..1 axis
    assert plots._vs_depth(result.rows, "grad_norm/stem").axes[0].get_ylim() == pytest.approx((0, 0.52))
    # a curve over optimizer steps says so
    assert plots._curves(result.rows, "grad_norm/stem").axes[0].get_xlabel() == "optimizer step"


def test_per_step_metrics_are_told_from_epoch_metrics_by_name_or_steps():
    per_epoch = [(1, 0.5), (2, 0.6), (3, 0.7)]
    per_step = [(s, float(s)) for s in range(1, 13)]
    assert not compare.is_per_step("val/top1", per_epoch, 3)
    assert compare.is_per_step("custom/thing", per_step, 3)  # its steps run past the 3 epochs
    assert compare.is_per_step("grad_norm/layer1", per_epoch[:1], 3)  # by name, even with one step logged
    # the last of 3 epochs of 4 steps: steps 9..12; logged every 5 steps (and each epoch's last): 10 and 12
    assert compare.last_epoch_mean(per_step, 3) == pytest.approx(10.5)
    assert compare.last_epoch_mean([(5, 1.0), (8, 2.0), (10, 3.0), (12, 5.0)], 3) == pytest.approx(4.0)
    assert compare.last_epoch_mean(per_step, None) == 12.0  # epochs unknown: the last value
    assert compare.last_epoch_mean([], 3) is None


def test_an_early_stopped_run_counts_the_epochs_it_ran(store: str):
    """train.epochs=100 but stopped after 3: best/epoch, logged at the last epoch, says how many epochs there were."""
    with tracking.Tracker.start(store, "early", run_name="r", params={"train.epochs": "100"},
                                tags={"task": "classification", "backbone": "resnet18", "depth": "18"}) as run:
        for step in range(1, 13):
            run.log_metrics({"custom/norm": 1.0 if step > 8 else 9.0}, step)
        run.log_metrics({"val/top1": 0.5, "best/epoch": 3}, 3)
    (row,) = compare.run("early", uri=store, metric="custom/norm").rows
    assert row.per_step["custom/norm"] and row.value == pytest.approx(1.0)


def test_a_metric_only_some_runs_logged_shows_dashes_and_leaves_their_points_out(said, store: str, degradation: str,
                                                                                 tmp_path: Path):
    result = compare.run("degradation_shapes", uri=store, metric="val/top1,val/loss", out=tmp_path / "figs")
    notes = [line for line in said if line.startswith("val/loss: not logged by 2 of 4 runs")]
    assert len(notes) == 1 and "cifar_plain20" in notes[0] and "cifar_plain56" in notes[0]
    header, *body = next(line for line in said if line.startswith("backbone")).splitlines()
    column = header.index("val/loss (best epoch)") + len("val/loss (best epoch)")
    assert [line[:column].split()[-1] for line in body] == ["-", "-", "0.1000", "0.0800"]
    lines = plots._vs_depth(result.rows, "val/loss").axes[0].get_lines()
    # one family left: its line needs no family in the label
    assert [(line.get_label(), list(line.get_xdata())) for line in lines] == [
        (f"sweep {degradation[:8]}, 3 epochs", [20, 56])]
    assert (tmp_path / "figs" / "val_loss_vs_depth.png").is_file()


def test_compare_cli_for_the_degradation_experiment(store: str, degradation: str, tmp_path: Path):
    out = tmp_path / "figs"
    result = CliRunner().invoke(main, ["compare", "degradation_shapes", "--metric", "train/loss_epoch,train/error",
                                       "--metric", "val/top1", "--at", "last", "--out", str(out), "--uri", store])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith("cifar_")]
    assert [row[0] for row in rows] == ["cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56"]
    assert [row[5:7] for row in rows] == [["0.2000", "0.1000"], ["0.4000", "0.2000"], ["0.1600", "0.0800"],
                                          ["0.1000", "0.0500"]]  # train/loss_epoch and train/error, last epoch
    for name in ("train_loss_epoch", "train_error", "val_top1"):
        assert (out / f"{name}_vs_depth.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "metric_vs_depth.png").exists()


@pytest.mark.parametrize("args, expected", [
    (("--metric", "val/nosuch"), "--metric val/nosuch: no run of 'degradation_shapes' logged it; they log "
                                 "best/epoch, best/top1, grad_norm/stem, train/error, train/loss_epoch, val/loss, "
                                 "val/top1"),
    (("--metric", "val/top1,val/nosuch,train/nosuch"), "--metric val/nosuch, train/nosuch: no run of "
                                                        "'degradation_shapes' logged them"),
    (("--metric", "val/top1,"), "--metric val/top1,: an empty name"),
    (("--at", "worst"), "--at worst: choose best"),
])
def test_compare_metric_and_at_errors_are_one_line(store: str, degradation: str, args, expected):
    result = CliRunner().invoke(main, ["compare", "degradation_shapes", *args, "--uri", store])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "model/depth" not in errors[0]  # run constants are no metric to compare


def test_pareto_front_of_a_metric_where_lower_is_better():
    points = [(1.0, 0.30), (2.0, 0.35), (3.0, 0.20), (4.0, 0.25)]  # (cost, loss)
    assert plots.pareto_front(points, higher_is_better=False) == [0, 2]
    assert (plots.better("val/top1"), plots.better("train/loss_epoch"), plots.better("train/error"),
            plots.better("grad_norm/stem")) == (1, -1, -1, 0)
