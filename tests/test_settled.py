"""A depth comparison knows whether its runs had settled: the rule (pipeline/study/settled.py), and what compare and a
sweep's summary say about runs that were still improving."""
import math
import shutil
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

from pipeline import tracking
from pipeline.study import compare, plots, settled, sweep
from pipeline.study.settled import judge
from pipeline.tasks.metric import Metric

TOP1, LOSS = Metric("val/top1"), Metric("val/loss", goal="min")


@pytest.mark.parametrize("values, metric, is_settled, gain", [
    ([0.2, 0.3, 0.35, 0.38, 0.39], TOP1, False, 0.04),  # still climbing: the last epoch beats the first four by 0.04
    ([0.6, 0.9, 0.97, 0.981, 0.978, 0.982, 0.98, 0.983], TOP1, True, 0.001),  # within 1% of 0.982: settled
    ([0.5, 0.45, 0.4, 0.41], LOSS, True, -0.01),  # lower is better, and the last epoch is no better
    ([0.5, 0.45, 0.4, 0.3], LOSS, False, 0.1),  # a loss still falling
    ([0.2, float("nan"), 0.5, 0.6], TOP1, False, 0.1),  # an epoch without a value changes nothing
])
def test_the_last_quarter_must_beat_the_earlier_best_by_more_than_one_percent(values, metric, is_settled, gain):
    verdict = judge(values, metric)
    assert verdict.settled is is_settled and verdict.gain == pytest.approx(gain)
    assert verdict.last == math.ceil(len(values) / 4) and verdict.epochs == len(values)
    assert verdict.cell == "yes" if is_settled else verdict.cell.startswith("no: ")


def test_a_run_at_the_metrics_perfect_value_has_settled():
    climbed = [0.9, 0.93, 0.95, 0.96, 0.96, 0.97, 0.98, 1.0]  # +0.03 in the last quarter, but nowhere left to go
    assert judge(climbed, Metric("val/top1", perfect=1.0)).settled
    assert not judge(climbed, TOP1).settled  # a metric without a known ceiling keeps the plain rule
    assert not judge(climbed[:-1] + [0.999], Metric("val/top1", perfect=1.0)).settled


def test_one_epoch_is_too_short_to_tell():
    verdict = judge([0.4], TOP1)
    assert not verdict.settled and math.isnan(verdict.gain) and verdict.cell == "no (1 epoch)"
    assert settled.advice("resnet50", verdict, "val/top1").startswith("resnet50: ran 1 epoch, too few to tell")


def test_the_advice_says_what_to_do():
    line = settled.advice("resnet50", judge([0.2, 0.3, 0.35, 0.38, 0.40], TOP1), "val/top1")
    assert line == ("resnet50: still improving at epoch 5/5 (val/top1 +0.05 in its last 2 epochs); train longer "
                    "before comparing depths")


@pytest.fixture
def sweep_store(tmp_path: Path, empty_store: Path, monkeypatch) -> str:
    """A sweep of two depths logged by hand: resnet18 settled at 0.98, resnet50 still climbing at epoch 5/5."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    curves = {"resnet18": [0.90, 0.97, 0.979, 0.98, 0.981], "resnet50": [0.2, 0.3, 0.35, 0.38, 0.40]}
    with tracking.Tracker.start(uri, "depths", run_name="sweep", params={},
                                tags={sweep.ROLE_TAG: "parent", "task": "classification"}) as parent:
        for name, curve in curves.items():
            tags = {"task": "classification", "backbone": name, "depth": name.removeprefix("resnet"), "gflops": "1"}
            with tracking.Tracker.start(uri, "depths", run_name=name, params={"train.epochs": "5"}, tags=tags,
                                        parent_run_id=parent.run_id) as run:
                for epoch, value in enumerate(curve, start=1):
                    run.log_metrics({"val/top1": value}, epoch)
                run.log_metrics({"best/top1": max(curve), "best/epoch": 5}, 5)
    return uri


def test_compare_marks_runs_still_improving_in_its_table_plots_and_lines(sweep_store: str, tmp_path: Path, said):
    result = compare.run("depths", uri=sweep_store, out=tmp_path / "plots")
    verdicts = {r.backbone: r.settled for r in result.rows}
    assert verdicts["resnet18"].settled and not verdicts["resnet50"].settled
    header, *rows = next(line for line in said if line.startswith("backbone")).splitlines()
    assert "settled" in header.split()
    assert " yes " in rows[0] and "no: +0.05 in last 2 epochs" in rows[1]
    assert ("resnet50: still improving at epoch 5/5 (val/top1 +0.05 in its last 2 epochs); train longer before "
            "comparing depths") in said
    assert not any(line.startswith("resnet18: still improving") for line in said)
    # the plot draws the run still improving as a hollow marker, and says what hollow means
    ax = plots._vs_depth(result.rows, "val/top1").axes[0]
    hollow = [c for c in ax.collections if tuple(c.get_facecolors()[0]) == to_rgba("white")]
    assert len(hollow) == 1 and [x for x, _ in hollow[0].get_offsets()] == [50]
    assert any(text.startswith("hollow: still improving") for text in ax.get_legend_handles_labels()[1])
    assert "settled" in (tmp_path / "plots" / "runs.csv").read_text().splitlines()[0]


def test_the_sweep_summary_marks_them_too():
    children = [sweep.Child({"model.backbone.name": "resnet18"}, "FINISHED", "a" * 32, 0.98, 10.0,
                            settled=judge([0.9, 0.97, 0.98, 0.981], TOP1)),
                sweep.Child({"model.backbone.name": "resnet50"}, "FINISHED", "b" * 32, 0.40, 30.0,
                            settled=judge([0.2, 0.3, 0.35, 0.40], TOP1))]
    text = sweep.summary(sweep.SweepResult("p" * 32, TOP1, children))
    header = next(line for line in text.splitlines() if line.startswith("model.backbone.name"))
    assert header.split()[:5] == ["model.backbone.name", "status", "best", "val/top1", "settled"]
    assert "resnet50: still improving at epoch 4/4 (val/top1 +0.05 in its last epoch)" in text
    assert "resnet18: still improving" not in text
