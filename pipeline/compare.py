"""`pipeline compare`: how much depth buys on a task, at what cost, read back from the runs in MLflow.

One row per finished training run of an experiment (backbone, depth, parameters, GFLOPs at the task's input size, the
metric at the best epoch, training img/s, wall time), sorted by depth, and three plots: the metric against depth, the
metric against GFLOPs with the Pareto front marked, and the metric's curve per run.

`by` names a tag or param (e.g. `weights.source`) that labels every row: the table gets its column, the depth plot
one line per value (points of different values are never joined), the curves carry it in their legend. Transfer
experiments compare a pretrained start with random init this way.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tasks.registry import TASKS

PLOTS = ("metric_vs_depth.png", "metric_vs_gflops.png", "curves.png")


@dataclass
class Row:
    run_id: str
    backbone: str
    depth: int | None
    num_params: int | None
    gflops: float | None
    value: float | None  # the compared metric at the run's best epoch
    throughput: float | None  # median training img/s over epochs
    wall_time: float | None
    parent_run_id: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    group: str | None = None  # the run's value of the `by` tag or param


@dataclass
class CompareResult:
    metric: str
    rows: list[Row]
    files: list[Path]
    logged_to: str | None  # the parent run the files were logged to


def run(experiment: str, uri: str | None = None, metric: str | None = None, out: str | Path | None = None,
        parent: str | None = None, by: str | None = None, say=print) -> CompareResult:
    """Print the table; with `out`, write the plots and a CSV there and log them to the sweep's parent run.

    `parent` limits the rows to the children of one sweep. Without it every finished run of the experiment is a row,
    and the files go to a parent run only when all rows share that parent.
    """
    uri = tracking.resolve_uri(uri)
    runs = [r for r in tracking.search_runs(uri, experiment, parent_run_id=parent)
            if r.status == "FINISHED" and r.tags.get("backbone")]  # sweep parents have no backbone
    if not runs:
        where = f"under parent run {parent}" if parent else f"in experiment '{experiment}'"
        raise UserError(f"no finished training runs {where} in {uri}; run 'pipeline sweep' or 'pipeline run' first")
    metric = metric or _primary(runs)
    rows = sorted((_row(uri, r, metric, by) for r in runs), key=_by_depth)
    if all(r.value is None for r in rows):
        logged = sorted({k for r in runs for k in r.metrics if k.startswith("val/")})
        raise UserError(f"--metric {metric}: no run of '{experiment}' logged it; they log {', '.join(logged)}")
    say(table(rows, metric, by))
    if out is None:
        return CompareResult(metric, rows, [], None)
    files = [*plot(rows, metric, Path(out)), write_csv(rows, metric, Path(out) / "runs.csv", by)]
    say(f"wrote {', '.join(str(f) for f in files)}")
    logged_to = parent or _common_parent(rows)
    if logged_to:
        tracker = tracking.Tracker.attach(uri, logged_to)
        for path in files:
            tracker.log_artifact(path, "compare")
        say(f"logged them to the sweep's parent run {logged_to} (artifacts: compare/)")
    elif any(r.parent_run_id for r in rows):
        say("not logged to a parent run: the rows come from several sweeps or single runs; pick one with --parent")
    return CompareResult(metric, rows, files, logged_to)


def _primary(runs: list[tracking.RunRecord]) -> str:
    tasks = {r.tags.get("task") for r in runs}
    known = [t for t in tasks if t in TASKS]
    if len(known) != 1 or len(tasks) != 1:
        raise UserError(f"the runs are of tasks {sorted(map(str, tasks))}, so the metric to compare is unclear; "
                        "give one with --metric (e.g. --metric val/top1)")
    return TASKS[known[0]].primary


def _row(uri: str, run: tracking.RunRecord, metric: str, by: str | None = None) -> Row:
    curve = tracking.metric_history(uri, run.run_id, metric)
    throughput = [v for _, v in tracking.metric_history(uri, run.run_id, "train/throughput")]
    tags = run.tags
    return Row(run_id=run.run_id, backbone=tags["backbone"], depth=_int(tags.get("depth")),
               num_params=_int(tags.get("num_params")), gflops=_float(tags.get("gflops")),
               value=at_best_epoch(curve, run.metrics.get("best/epoch")),
               throughput=statistics.median(throughput) if throughput else None, wall_time=run.wall_time,
               parent_run_id=run.parent_run_id, curve=curve,
               group=(run.tags.get(by) or run.params.get(by) or "-") if by else None)


def at_best_epoch(curve: list[tuple[int, float]], best_epoch: float | None) -> float | None:
    """The metric at the epoch the best checkpoint comes from; the last value for runs that did not log it.

    Taking the best checkpoint's epoch rather than the metric's own max or min keeps every column about the same
    model, and needs no rule for which direction is better (top1 up, loss down).
    """
    if not curve:
        return None
    at_best = [v for step, v in curve if best_epoch is not None and step == int(best_epoch)]
    return at_best[-1] if at_best else curve[-1][1]


def _by_depth(row: Row) -> tuple:
    return (row.depth is None, row.depth or 0, row.backbone, row.group or "", row.run_id)


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().lstrip("-").isdigit() else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _common_parent(rows: list[Row]) -> str | None:
    parents = {r.parent_run_id for r in rows}
    return parents.pop() if len(parents) == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Table and CSV


def table(rows: list[Row], metric: str, by: str | None = None) -> str:
    header = ["backbone", "depth", "params", "GFLOPs", metric, "train img/s", "wall time", "run id"]
    lines = [header] + [[r.backbone, _fmt(r.depth), _fmt(r.num_params, "{:,}"), _fmt(r.gflops, "{:.2f}"),
                         _fmt(r.value, "{:.4f}"), _fmt(r.throughput, "{:.0f}"), _fmt(r.wall_time, "{:.0f}s"),
                         r.run_id] for r in rows]
    left = {0, 7}  # names left-aligned, numbers right-aligned
    if by:
        lines = [line[:1] + [by if i == 0 else rows[i - 1].group] + line[1:] for i, line in enumerate(lines)]
        left = {0, 1, 8}
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in lines)


def _fmt(value, pattern: str = "{}") -> str:
    return "-" if value is None else pattern.format(value)


def write_csv(rows: list[Row], metric: str, path: Path, by: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "backbone", *([by] if by else []), "depth", "num_params", "gflops", metric,
                         "train_img_s", "wall_time_s"])
        for r in rows:
            writer.writerow([r.run_id, r.backbone, *([r.group] if by else []), r.depth, r.num_params, r.gflops,
                             r.value, r.throughput, r.wall_time])
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, value) points that no other point beats: none is cheaper-or-equal and better.

    Sorted by cost; ties in cost keep only the best value.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows: list[Row], metric: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in PLOTS]
    for figure, path in zip((_vs_depth(rows, metric), _vs_gflops(rows, metric), _curves(rows, metric)), paths):
        figure.savefig(path, dpi=110, bbox_inches="tight")
    return paths


def _vs_depth(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    shown = [r for r in rows if r.depth is not None and r.value is not None]
    groups = sorted({r.group for r in shown}, key=str)
    for group in groups:  # one line per group: points of different groups are never joined
        members = [r for r in shown if r.group == group]
        ax.plot([r.depth for r in members], [r.value for r in members], "o-", label=group)
    if groups != [None]:
        ax.legend(fontsize=8)
    for r in shown:
        ax.annotate(r.backbone, (r.depth, r.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="depth (layers)", ylabel=f"{metric} (best epoch)", title=f"{metric} vs depth")
    ax.grid(alpha=0.3)
    return fig


def _vs_gflops(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    shown = [r for r in rows if r.gflops is not None and r.value is not None]
    ax.scatter([r.gflops for r in shown], [r.value for r in shown], color="tab:gray", label="runs")
    front = [shown[i] for i in pareto_front([(r.gflops, r.value) for r in shown])]
    ax.plot([r.gflops for r in front], [r.value for r in front], "o-", color="tab:red", label="Pareto front")
    for r in shown:
        ax.annotate(r.backbone, (r.gflops, r.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="GFLOPs per image (multiply-accumulates)", ylabel=f"{metric} (best epoch)",
           title=f"{metric} vs compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _curves(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for r in rows:
        if r.curve:
            steps, values = zip(*r.curve)
            group = f", {r.group}" if r.group else ""
            ax.plot(steps, values, "o-" if len(steps) == 1 else "-", label=f"{r.backbone}{group} ({r.run_id[:6]})")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(r.curve for r in rows):
        ax.legend(fontsize=8)
    return fig
