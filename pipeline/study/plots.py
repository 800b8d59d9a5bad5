"""The plots of `pipeline compare` (pipeline/study/compare.py gathers the rows): a metric against depth, against GFLOPs
with the Pareto front, wall time against depth, and the metric's curve per run; a run still improving when it stopped
is a hollow marker (pipeline/study/settled.py).

A line joins only runs of one sweep, one epoch count, one `by` value and one backbone family; legends sit outside the
axes; fractions are drawn on 0..1 and other non-negative values from 0 (see `_y_axis`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.study.rows import Row, better, number, sweep_label


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the (cost, value) points that no other point beats: none is cheaper-or-equal and better.

    Sorted by cost; ties in cost keep only the best value.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def file_stem(metric: str) -> str:
    """A metric's name as a file name: train/error -> train_error."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_") or "metric"


def plot(rows: list[Row], readings: dict[str, str], out: Path, goals: dict[str, int] | None = None) -> list[Path]:
    """metric_vs_depth.png for one metric, <metric>_vs_depth.png for each of several; the GFLOPs plot and the curves
    show the first metric. `goals`: which way is better for a metric (1 higher, -1 lower), where the task declares it
    (its primary metric); other metrics go by `better`."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(readings)
    first = metrics[0]
    figures: dict[str, Figure] = {}
    if len(metrics) == 1:
        figures["metric_vs_depth.png"] = _vs_depth(rows, first, readings[first])
    else:
        for m in metrics:
            figures[f"{file_stem(m)}_vs_depth.png"] = _vs_depth(rows, m, readings[m])
    figures["metric_vs_gflops.png"] = _vs_gflops(rows, first, readings[first], (goals or {}).get(first))
    figures["time_vs_depth.png"] = _time_vs_depth(rows)
    figures["curves.png"] = _curves(rows, first)
    paths = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")  # "tight" takes in the legends outside the axes
        paths.append(out / name)
    return paths


def lines(rows: list[Row]) -> dict[tuple, list[Row]]:
    """The rows a plot line may join: one sweep, one epoch count, one backbone family, one `by` value. Runs outside a
    sweep share no line."""
    found: dict[tuple, list[Row]] = {}
    for r in rows:
        found.setdefault(r.line if r.parent_run_id else (*r.line, r.run_id), []).append(r)
    return found


def _label(members: list[Row], with_family: bool = False) -> str:
    """The line's family (when the plot holds several), `by` value, sweep or run, and epochs."""
    r = members[0]
    parts = [r.family] if with_family else []
    parts += [r.group] if r.group is not None else []
    parts.append(f"sweep {sweep_label(r.parent_run_id)}" if r.parent_run_id else f"run {r.run_id[:8]}")
    parts.append(f"{r.epochs} epochs" if r.epochs is not None else "epochs unknown")
    return ", ".join(parts)


def _by_depth(rows: list[Row], y) -> Figure:
    """y(row) against depth: one line per sweep, epoch count, family and `by` value; a line whose runs repeat a depth
    (a sweep over depth and learning rate, say) would zigzag between them, so its runs stay points."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    shown = [r for r in rows if r.depth is not None and y(r) is not None]
    with_family = len({r.family for r in shown}) > 1
    for members in lines(shown).values():
        members = sorted(members, key=lambda r: r.depth)
        joined = len(members) > 1 and len({r.depth for r in members}) == len(members)
        label = _label(members, with_family) + ("" if joined or len(members) == 1 else " (not joined: repeated depths)")
        (line,) = ax.plot([r.depth for r in members], [y(r) for r in members], "o-" if joined else "o", label=label)
        _hollow(ax, [(r.depth, y(r)) for r in members if unsettled(r)], line.get_color())
    return fig


def unsettled(row: Row) -> bool:
    return row.settled is not None and not row.settled.settled


def _hollow(ax, points: list[tuple[float, float]], color: str) -> None:
    """Runs still improving when they stopped, as hollow markers over their points (the legend says so once)."""
    if not points:
        return
    labelled = any(text == _HOLLOW for text in ax.get_legend_handles_labels()[1])
    ax.scatter(*zip(*points), s=40, facecolors="white", edgecolors=color, linewidths=1.5, zorder=3,
               label="_nolegend_" if labelled else _HOLLOW)


_HOLLOW = "hollow: still improving (train longer)"


def _vs_depth(rows: list[Row], metric: str, how: str = "best epoch") -> Figure:
    fig = _by_depth(rows, lambda r: r.values.get(metric))
    ax = fig.axes[0]
    shown = [(r, r.values[metric]) for r in rows if r.depth is not None and r.values.get(metric) is not None]
    _annotate(ax, [(r.depth, v, f"{r.backbone} {number(v, 3)}") for r, v in shown])
    _y_axis(ax, [v for _, v in shown], f"{metric} ({how})", fractions=not any(r.per_step.get(metric) for r in rows))
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


def _vs_gflops(rows: list[Row], metric: str, how: str = "best epoch", direction: int | None = None) -> Figure:
    """The metric against compute, with a Pareto front per sweep, epoch count and `by` value: the families of one sweep
    compete (which buys most per GFLOP), runs of other budgets do not. A metric with no better direction (a gradient
    norm) gets no front."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    shown = [r for r in rows if r.gflops is not None and r.values.get(metric) is not None]
    ax.scatter([r.gflops for r in shown], [r.values[metric] for r in shown], color="tab:gray", label="runs")
    _hollow(ax, [(r.gflops, r.values[metric]) for r in shown if unsettled(r)], "tab:gray")
    direction = better(metric) if direction is None else direction
    budgets: dict[tuple, list[Row]] = {}
    for r in shown:
        if r.parent_run_id and direction:
            sweep, epochs, _, group = r.line
            budgets.setdefault((sweep, epochs, group), []).append(r)
    for members in budgets.values():
        if len(members) > 1:
            points = [(r.gflops, r.values[metric]) for r in members]
            front = [members[i] for i in pareto_front(points, higher_is_better=direction > 0)]
            ax.plot([r.gflops for r in front], [r.values[metric] for r in front], "o-",
                    label=f"Pareto front, {_label(front)}")
    _annotate(ax, [(r.gflops, r.values[metric], f"{r.backbone} {number(r.values[metric], 3)}") for r in shown])
    _y_axis(ax, [r.values[metric] for r in shown], f"{metric} ({how})",
            fractions=not any(r.per_step.get(metric) for r in rows))
    ax.set(xlabel="GFLOPs per image (multiply-accumulates)", title=f"{metric} vs compute")
    _finish(ax)
    return fig


def _curves(rows: list[Row], metric: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in rows:
        curve = r.curves.get(metric)
        if curve:
            steps, values = zip(*curve)
            group = f", {r.group}" if r.group else ""
            epochs = f", {r.epochs} epochs" if r.epochs is not None else ""
            ax.plot(steps, values, "o-" if len(steps) == 1 else "-",
                    label=f"{r.backbone}{group}{epochs} ({r.run_id[:8]})")
    per_step = any(r.per_step.get(metric) for r in rows)
    _y_axis(ax, [v for r in rows for _, v in r.curves.get(metric, [])], metric, fractions=not per_step)
    unit = "optimizer step" if per_step else "epoch"
    ax.set(xlabel=unit, title=f"{metric} per {unit}")
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


def _y_axis(ax, values: list[float], label: str, fractions: bool = True) -> None:
    """An axis whose distances read as differences: fractions on 0..1, other non-negative values from 0. Only an axis
    with negative values is fit to the points, and its label says so. `fractions=False` (gradient norms, learning
    rates: small, but no fraction) draws values below 1 from 0 to their largest, not on 0..1 where they would lie flat
    on the floor."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if values and min(values) >= 0:
        top = 1.0 if fractions and max(values) <= 1 else max(values)
        ax.set_ylim(0, (top or 1.0) * 1.04)  # a little room above, so a point at the top is drawn whole
    elif values:
        label += " (axis fit to the points)"
    ax.set_ylabel(label)


def _finish(ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # outside the axes, on the right: a legend never covers a point
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
