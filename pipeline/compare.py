"""`pipeline compare`: how much depth buys on a task, at what cost, read back from the runs in MLflow.

Which runs: the experiment's latest sweep by default (the sweep whose newest finished run started last), one sweep
with `parent` (a run id or any unique prefix of one, such as the `23b984f9` of its folder `sweep-23b984f9`), or every
finished run with `every`. An experiment without sweeps shows every finished run.

One row per finished training run (backbone, depth, epochs, parameters, GFLOPs at the task's input size, the metric
at the best epoch, training img/s, wall time), sorted by depth, and four plots: the metric against depth, the metric
against GFLOPs with the Pareto front marked, wall time against depth, and the metric's curve per run.

The plots cannot mislead: a line joins only runs of one sweep with one epoch count (and one value of `by`, a tag or
param such as `weights.source` that labels every row); runs outside a sweep, and runs of a line that repeat a depth,
are points that no line joins. Legends sit outside the axes, so no point hides behind one. Fractions (accuracy, mAP,
IoU) are drawn on 0..1 and other non-negative values from 0, so two close runs look close; an axis fit to the points
says so in its label.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tasks.registry import TASKS

PLOTS = ("metric_vs_depth.png", "metric_vs_gflops.png", "time_vs_depth.png", "curves.png")


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
    epochs: int | None = None  # train.epochs as configured

    @property
    def line(self) -> tuple[str, int, str]:
        """What a plot line holds in common: sweep, epochs and `by` value (as sortable text and numbers)."""
        return self.parent_run_id or "", self.epochs or 0, self.group or ""


@dataclass
class CompareResult:
    metric: str
    rows: list[Row]
    files: list[Path]
    logged_to: str | None  # the parent run the files were logged to


def run(experiment: str, uri: str | None = None, metric: str | None = None, out: str | Path | None = None,
        parent: str | None = None, by: str | None = None, every: bool = False, say=print) -> CompareResult:
    """Print the table; with `out`, write the plots and a CSV there and log them to the sweep's parent run.

    `parent` (a run id or a unique prefix of one) picks a sweep, `every` takes every finished run; by default the
    latest sweep, or every finished run of an experiment without sweeps. The files go to a parent run only when all
    rows share that parent.
    """
    if parent and every:
        raise UserError("--parent picks one sweep and --all takes every run; give one of them")
    uri = tracking.resolve_uri(uri)
    every_run = tracking.search_runs(uri, experiment)
    runs = [r for r in every_run if r.status == "FINISHED" and r.tags.get("backbone")]  # sweep parents have none
    if parent:
        parent = resolve_run_id(every_run, parent, experiment)
        runs = [r for r in runs if r.parent_run_id == parent]
    elif not every:
        parent = latest_sweep(runs)
        if parent:
            chosen = [r for r in runs if r.parent_run_id == parent]
            others = len(runs) - len(chosen)
            more = (f"; {others} more finished run{'s' * (others > 1)} in '{experiment}': --all for every run, "
                    "--parent ID for one sweep") if others else ""
            say(f"latest sweep {parent[:8]} ({_name(every_run, parent)}): {len(chosen)} runs{more}")
            runs = chosen
    if not runs:
        where = f"under parent run {parent}" if parent else f"in experiment '{experiment}'"
        raise UserError(f"no finished training runs {where} in {uri}; run 'pipeline sweep' or 'pipeline run' first")
    metric = metric or _primary(runs)
    newest = _newest_start(runs)
    rows = sorted((_row(uri, r, metric, by) for r in runs), key=lambda row: _order(row, newest))
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


def latest_sweep(runs: list[tracking.RunRecord]) -> str | None:
    """The parent id of the sweep whose newest run started last (a resumed sweep counts from its new runs)."""
    newest = {parent: start for parent, start in _newest_start(runs).items() if parent}
    return max(newest, key=newest.get) if newest else None


def _newest_start(runs: list[tracking.RunRecord]) -> dict[str, float]:
    """Parent run id ("" for runs outside a sweep) -> the latest start time of its runs."""
    newest: dict[str, float] = {}
    for r in runs:
        key = r.parent_run_id or ""
        newest[key] = max(newest.get(key, 0.0), r.start_time or 0.0)
    return newest


def resolve_run_id(runs: list[tracking.RunRecord], text: str, experiment: str) -> str:
    """The run of `runs` whose id starts with `text` (a whole id, a prefix such as `23b984f9`, or a sweep folder's
    name `sweep-23b984f9`); no match, or several, is a `UserError` naming the candidates."""
    prefix = text.strip().lower().removeprefix("sweep-")
    matches = [r for r in runs if prefix and r.run_id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0].run_id
    if matches:
        shown = ", ".join(f"{r.run_id} ({r.name})" for r in matches[:6])
        more = f" and {len(matches) - 6} more" if len(matches) > 6 else ""
        raise UserError(f"--parent {text} is ambiguous: {len(matches)} runs of '{experiment}' have ids starting with "
                        f"'{prefix}': {shown}{more}; give more characters")
    sweeps = list(dict.fromkeys(r.parent_run_id for r in reversed(runs) if r.parent_run_id))[:6]
    listed = ", ".join(f"{p[:8]} ({_name(runs, p)})" for p in sweeps) or "none"
    raise UserError(f"--parent {text}: no run of '{experiment}' has an id starting with '{prefix}'; its sweeps, "
                    f"newest first: {listed}")


def _name(runs: list[tracking.RunRecord], run_id: str) -> str:
    return next((r.name for r in runs if r.run_id == run_id), "") or "unnamed"


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
               group=(run.tags.get(by) or run.params.get(by) or "-") if by else None,
               epochs=_int(run.params.get("train.epochs")))


def at_best_epoch(curve: list[tuple[int, float]], best_epoch: float | None) -> float | None:
    """The metric at the epoch the best checkpoint comes from; the last value for runs that did not log it.

    Taking the best checkpoint's epoch rather than the metric's own max or min keeps every column about the same
    model, and needs no rule for which direction is better (top1 up, loss down).
    """
    if not curve:
        return None
    at_best = [v for step, v in curve if best_epoch is not None and step == int(best_epoch)]
    return at_best[-1] if at_best else curve[-1][1]


def _order(row: Row, newest: dict[str, float]) -> tuple:
    """By depth within a sweep, epoch count and `by` value; several sweeps stay apart, the latest first, then the runs
    outside a sweep."""
    sweep, epochs, group = row.line
    return (not sweep, -newest.get(sweep, 0.0), sweep, epochs, group, row.depth is None, row.depth or 0, row.backbone,
            row.run_id)


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
    """Names left-aligned, numbers right-aligned; a `sweep` column only when the rows come from several sweeps (or
    from single runs and sweeps), so that two rows of one backbone are told apart."""
    columns = [("backbone", [r.backbone for r in rows], True)]
    if by:
        columns.append((by, [r.group or "-" for r in rows], True))
    columns += [("depth", [_fmt(r.depth) for r in rows], False),
                ("epochs", [_fmt(r.epochs) for r in rows], False),
                ("params", [_fmt(r.num_params, "{:,}") for r in rows], False),
                ("GFLOPs", [_fmt(r.gflops, "{:.2f}") for r in rows], False),
                (metric, [_fmt(r.value, "{:.4f}") for r in rows], False),
                ("train img/s", [_fmt(r.throughput, "{:.0f}") for r in rows], False),
                ("wall time", [_fmt(r.wall_time, "{:.0f}s") for r in rows], False)]
    if len({r.parent_run_id for r in rows}) > 1:
        columns.append(("sweep", [_sweep(r.parent_run_id) for r in rows], True))
    columns.append(("run id", [r.run_id for r in rows], True))
    widths = [max(len(head), *(len(v) for v in values)) for head, values, _ in columns]
    lines = []
    for i in range(len(rows) + 1):
        cells = [(head if i == 0 else values[i - 1], left) for head, values, left in columns]
        lines.append("  ".join(c.ljust(w) if left else c.rjust(w) for (c, left), w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def _fmt(value, pattern: str = "{}") -> str:
    return "-" if value is None else pattern.format(value)


def _sweep(parent_run_id: str | None) -> str:
    return parent_run_id[:8] if parent_run_id else "-"


def write_csv(rows: list[Row], metric: str, path: Path, by: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "backbone", *([by] if by else []), "depth", "epochs", "num_params", "gflops", metric,
                         "train_img_s", "wall_time_s", "parent_run_id"])
        for r in rows:
            writer.writerow([r.run_id, r.backbone, *([r.group] if by else []), r.depth, r.epochs, r.num_params,
                             r.gflops, r.value, r.throughput, r.wall_time, r.parent_run_id or ""])
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
    figures = (_vs_depth(rows, metric), _vs_gflops(rows, metric), _time_vs_depth(rows), _curves(rows, metric))
    for figure, path in zip(figures, paths):
        figure.savefig(path, dpi=110, bbox_inches="tight")  # "tight" takes in the legends outside the axes
    return paths


def lines(rows: list[Row]) -> dict[tuple, list[Row]]:
    """The rows a plot line may join: one sweep, one epoch count, one `by` value. Runs outside a sweep share no line."""
    found: dict[tuple, list[Row]] = {}
    for r in rows:
        found.setdefault(r.line if r.parent_run_id else ("", r.epochs or 0, r.group or "", r.run_id), []).append(r)
    return found


def _label(members: list[Row]) -> str:
    r = members[0]
    parts = [r.group] if r.group is not None else []
    parts.append(f"sweep {_sweep(r.parent_run_id)}" if r.parent_run_id else f"run {r.run_id[:8]}")
    parts.append(f"{r.epochs} epochs" if r.epochs is not None else "epochs unknown")
    return ", ".join(parts)


def _by_depth(rows: list[Row], y) -> Figure:
    """y(row) against depth: one line per sweep, epoch count and `by` value; a line whose runs repeat a depth (a
    sweep over depth and learning rate, say) would zigzag between them, so its runs stay points."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for members in lines([r for r in rows if r.depth is not None and y(r) is not None]).values():
        members = sorted(members, key=lambda r: r.depth)
        joined = len(members) > 1 and len({r.depth for r in members}) == len(members)
        label = _label(members) + ("" if joined or len(members) == 1 else " (not joined: repeated depths)")
        ax.plot([r.depth for r in members], [y(r) for r in members], "o-" if joined else "o", label=label)
    return fig


def _vs_depth(rows: list[Row], metric: str) -> Figure:
    fig = _by_depth(rows, lambda r: r.value)
    ax = fig.axes[0]
    shown = [r for r in rows if r.depth is not None and r.value is not None]
    _annotate(ax, [(r.depth, r.value, f"{r.backbone} {r.value:.3f}") for r in shown])
    _y_axis(ax, [r.value for r in shown], f"{metric} (best epoch)")
    ax.set(xlabel="depth (layers)", title=f"{metric} vs depth")
    _finish(ax)
    return fig


def _time_vs_depth(rows: list[Row]) -> Figure:
    fig = _by_depth(rows, lambda r: r.wall_time)
    ax = fig.axes[0]
    shown = [r for r in rows if r.depth is not None and r.wall_time is not None]
    _annotate(ax, [(r.depth, r.wall_time, f"{r.backbone} {r.wall_time:.0f}s") for r in shown])
    _y_axis(ax, [r.wall_time for r in shown], "wall time of the run (s)")
    ax.set(xlabel="depth (layers)", title="wall time vs depth (grows with the epochs: compare within a line)")
    _finish(ax)
    return fig


def _vs_gflops(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    shown = [r for r in rows if r.gflops is not None and r.value is not None]
    ax.scatter([r.gflops for r in shown], [r.value for r in shown], color="tab:gray", label="runs")
    for members in lines(shown).values():  # a front per sweep and epoch count: runs of other budgets do not compete
        if len(members) > 1:
            front = [members[i] for i in pareto_front([(r.gflops, r.value) for r in members])]
            ax.plot([r.gflops for r in front], [r.value for r in front], "o-", label=f"Pareto front, {_label(front)}")
    _annotate(ax, [(r.gflops, r.value, f"{r.backbone} {r.value:.3f}") for r in shown])
    _y_axis(ax, [r.value for r in shown], f"{metric} (best epoch)")
    ax.set(xlabel="GFLOPs per image (multiply-accumulates)", title=f"{metric} vs compute")
    _finish(ax)
    return fig


def _curves(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in rows:
        if r.curve:
            steps, values = zip(*r.curve)
            group = f", {r.group}" if r.group else ""
            epochs = f", {r.epochs} epochs" if r.epochs is not None else ""
            ax.plot(steps, values, "o-" if len(steps) == 1 else "-",
                    label=f"{r.backbone}{group}{epochs} ({r.run_id[:8]})")
    _y_axis(ax, [v for r in rows for _, v in r.curve], metric)
    ax.set(xlabel="epoch", title=f"{metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax)
    return fig


def _annotate(ax, points: list[tuple[float, float, str]]) -> None:
    """Label each point; labels of the right half go to the left of their point, so they stay inside the axes, and
    labels of points at one x (one depth in several sweeps) stack upwards instead of printing over each other."""
    xs = [x for x, _, _ in points]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    stacked: dict[float, int] = {}
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        right, level = x > middle, stacked.get(x, 0)
        stacked[x] = level + 1
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4 if right else 4, 4 + 10 * level), fontsize=8,
                    ha="right" if right else "left")


def _y_axis(ax, values: list[float], label: str) -> None:
    """An axis whose distances read as differences: fractions on 0..1, other non-negative values from 0. Only an axis
    with negative values is fit to the points, and its label says so."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if values and min(values) >= 0:
        top = 1.0 if max(values) <= 1 else max(values)
        ax.set_ylim(0, top * 1.04)  # a little room above, so a point at the top is drawn whole
    elif values:
        label += " (axis fit to the points)"
    ax.set_ylabel(label)


def _finish(ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # outside the axes, on the right: a legend never covers a point
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
