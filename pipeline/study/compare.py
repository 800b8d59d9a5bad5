"""`pipeline compare`: how much depth buys on a task, at what cost, read back from the runs in MLflow.

Which runs: the experiment's latest sweep by default (the sweep whose newest finished run started last), one sweep
with `parent` (a run id or any unique prefix of one, such as the `23b984f9` of its folder `sweep-23b984f9`), or every
finished run with `every`. An experiment without sweeps shows every finished run.

One row per finished training run (backbone, depth, epochs, parameters, GFLOPs at the task's input size, each
compared metric, training img/s, wall time), sorted by depth within each family, and plots: each metric against depth,
the first metric against GFLOPs with the Pareto front marked, wall time against depth, and the first metric's curve per
run (drawn by pipeline/plots.py).

Which value of a metric (`at`): `best`, the value at the best checkpoint's epoch (what the model kept scores), or
`last`, the last logged value (the end of training, as the degradation experiment compares training error). Metrics the
engine logs per optimizer step (`grad_norm/<stage>`, `lr/<group>`, `train/loss`, and any metric whose steps run past
the run's epochs) have no best epoch: either way they read as the mean of the values logged in the run's last epoch.

The plots cannot mislead: a line joins only runs of one sweep with one epoch count, one backbone family (cifar_plain56
-> cifar_plain, resnet50 -> resnet: plain and residual nets are two lines) and one value of `by` (a tag or param such
as `weights.source` that labels every row); runs outside a sweep, and runs of a line that repeat a depth, are points
that no line joins. A run that did not log a metric shows '-' and is left out of that metric's plots. Legends sit
outside the axes, so no point hides behind one. Fractions (accuracy, mAP, IoU) are drawn on 0..1 and other non-negative
values from 0, so two close runs look close; an axis fit to the points says so in its label.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.study.rows import NOT_COMPARED, PER_STEP_NAMES, PER_STEP_PREFIXES, Row, better, table, write_csv
from pipeline.study.settled import advice, judge
from pipeline.tasks import registry
from pipeline.tasks.metric import Metric

log = logging.getLogger(__name__)

# With one metric; with several, each gets <metric>_vs_depth.png (slashes as "_") in place of metric_vs_depth.png, and
# the other three plots show the first.
PLOTS = ("metric_vs_depth.png", "metric_vs_gflops.png", "time_vs_depth.png", "curves.png")
AT = ("best", "last")
@dataclass
class CompareResult:
    metric: str  # the first compared metric
    rows: list[Row]
    files: list[Path]
    logged_to: str | None  # the parent run the files were logged to
    metrics: list[str] = field(default_factory=list)  # every compared metric, in the order given


def run(experiment: str, uri: str | None = None, metric: str | Sequence[str] | None = None,
        out: str | Path | None = None, parent: str | None = None, by: str | None = None, every: bool = False,
        at: str = "best") -> CompareResult:
    """Print the table; with `out`, write the plots and a CSV there and log them to the sweep's parent run.

    `metric`: one name, several comma separated, or a sequence of either (default: the task's primary). `at`: `best`
    or `last` (see the module's docstring). `parent` (a run id or a unique prefix of one) picks a sweep, `every` takes
    every finished run; by default the latest sweep, or every finished run of an experiment without sweeps. The files
    go to a parent run only when all rows share that parent.
    """
    if parent and every:
        raise UserError("--parent picks one sweep and --all takes every run; give one of them")
    if at not in AT:
        raise UserError(f"--at {at}: choose best (at the best checkpoint's epoch) or last (the end of training)")
    metrics = parse_metrics(metric)
    tracking.quiet_console()  # MLflow's INFO lines (a new store's tables) are not the comparison
    uri = tracking.resolve_uri(uri)
    tracking.check_exists(uri)
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
            log.info(f"latest sweep {parent[:8]} ({_name(every_run, parent)}): {len(chosen)} runs{more}")
            runs = chosen
    if not runs:
        where = f"under parent run {parent}" if parent else f"in experiment '{experiment}'"
        raise UserError(f"no finished training runs {where} in {uri}; run 'pipeline sweep' or 'pipeline run' first")
    primary = _primary(runs)  # the task's, with its direction: what compare shows unless told otherwise
    if not metrics and primary is None:
        tasks = sorted({str(r.tags.get("task")) for r in runs})
        raise UserError(f"the runs are of tasks {tasks}, so the metric to compare is unclear; give one with --metric "
                        "(e.g. --metric val/top1)")
    metrics = metrics or [primary.name]
    newest = _newest_start(runs)
    judged_by = primary or _heuristic(metrics[0])  # whether a run had settled: by the task's primary metric
    rows = sorted((_row(uri, r, metrics, by, at, judged_by) for r in runs), key=lambda row: _order(row, newest))
    _check_logged(rows, runs, metrics, experiment)
    readings = {m: reading(rows, m, at) for m in metrics}
    log.info(table(rows, readings, by))
    for row in rows:
        if row.settled is not None and not row.settled.settled:
            log.info(advice(row.backbone, row.settled, judged_by.name))
    if out is None:
        return CompareResult(metrics[0], rows, [], None, metrics)
    from pipeline.study import plots  # matplotlib only when there is something to draw

    goals = {primary.name: 1 if primary.goal == "max" else -1} if primary else {}  # where the task declares it
    files = [*plots.plot(rows, readings, Path(out), goals), write_csv(rows, readings, Path(out) / "runs.csv", by)]
    log.info(f"wrote {', '.join(str(f) for f in files)}")
    logged_to = parent or _common_parent(rows)
    if logged_to:
        tracker = tracking.Tracker.attach(uri, logged_to)
        for path in files:
            tracker.log_artifact(path, "compare")
        log.info(f"logged them to the sweep's parent run {logged_to} (artifacts: compare/)")
    elif any(r.parent_run_id for r in rows):
        log.info("not logged to a parent run: the rows come from several sweeps or single runs; pick one with --parent")
    return CompareResult(metrics[0], rows, files, logged_to, metrics)


def parse_metrics(given: str | Sequence[str] | None) -> list[str]:
    """`val/top1`, `train/error,val/top1` or a sequence of such texts -> the names in order, each once."""
    texts = [given] if isinstance(given, str) else list(given or [])
    names = [name.strip() for text in texts for name in text.split(",")]
    if any(not name for name in names):
        raise UserError(f"--metric {','.join(texts)}: an empty name; give names such as train/error,val/top1")
    return list(dict.fromkeys(names))


def _check_logged(rows: list[Row], runs: list[tracking.RunRecord], metrics: list[str], experiment: str) -> None:
    """A metric no run logged is an error naming what the runs do log; one only some runs logged is said, once."""
    missing = [m for m in metrics if all(r.values[m] is None for r in rows)]
    if missing:
        logged = sorted({k for r in runs for k in r.metrics if not k.startswith(NOT_COMPARED)})
        raise UserError(f"--metric {', '.join(missing)}: no run of '{experiment}' logged "
                        f"{'it' if len(missing) == 1 else 'them'}; they log {', '.join(logged) or 'no metrics'}")
    for m in metrics:
        absent = [r for r in rows if r.values[m] is None]
        if absent:
            names = ", ".join(f"{r.backbone} ({r.run_id[:8]})" for r in absent)
            log.info(f"{m}: not logged by {len(absent)} of {len(rows)} runs ({names}); shown as '-', left out of its "
                     "plots")


def reading(rows: list[Row], metric: str, at: str) -> str:
    """Which value of `metric` the rows hold, in words, for the table's header and the plots' axes."""
    if any(r.per_step.get(metric) for r in rows):
        return "mean of last epoch"
    return {"best": "best epoch", "last": "last"}[at]


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


def _primary(runs: list[tracking.RunRecord]) -> Metric | None:
    """The primary metric of the runs' task; None when they are of several tasks or of one this pipeline lacks."""
    tasks = {r.tags.get("task") for r in runs}
    (task,) = tasks if len(tasks) == 1 else (None,)
    return registry.TASKS[task].primary if task in registry.TASKS else None


def _heuristic(metric: str) -> Metric | None:
    """A metric no task declares: higher is better unless its name says loss or error; none for per-step values."""
    direction = better(metric)
    return Metric(metric, "max" if direction > 0 else "min") if direction else None


def _row(uri: str, run: tracking.RunRecord, metrics: list[str], by: str | None = None, at: str = "best",
         judged_by: Metric | None = None) -> Row:
    throughput = [v for _, v in tracking.metric_history(uri, run.run_id, "train/throughput")]
    tags = run.tags
    epochs = _int(run.params.get("train.epochs"))
    # The epochs it ran: best/epoch is logged once, at the last epoch (an early-stopped run ran fewer than configured)
    finished_at = tracking.metric_history(uri, run.run_id, "best/epoch")
    ran = finished_at[-1][0] if finished_at else epochs
    curves = {m: tracking.metric_history(uri, run.run_id, m) for m in metrics}
    per_step = {m: is_per_step(m, curve, ran) for m, curve in curves.items()}
    values = {m: last_epoch_mean(curve, ran) if per_step[m] else value_of(curve, at, run.metrics.get("best/epoch"))
              for m, curve in curves.items()}
    judged = None
    if judged_by is not None:
        history = curves.get(judged_by.name) or tracking.metric_history(uri, run.run_id, judged_by.name)
        judged = judge([v for _, v in history], judged_by) if history else None
    return Row(run_id=run.run_id, backbone=tags["backbone"], depth=_int(tags.get("depth")),
               num_params=_int(tags.get("num_params")), gflops=_float(tags.get("gflops")), values=values,
               throughput=statistics.median(throughput) if throughput else None, wall_time=run.wall_time,
               parent_run_id=run.parent_run_id, curves=curves, per_step=per_step,
               group=(run.tags.get(by) or run.params.get(by) or "-") if by else None, epochs=epochs, settled=judged)


def is_per_step(metric: str, curve: list[tuple[int, float]], epochs: int | None) -> bool:
    """Whether the metric's MLflow steps count optimizer steps rather than epochs: the engine's per-step metrics by
    name (grad_norm/<stage>, lr/<group>, train/loss), and any other metric whose steps run past the run's epochs."""
    if metric.startswith(PER_STEP_PREFIXES) or metric in PER_STEP_NAMES:
        return True
    return bool(curve and epochs and curve[-1][0] > epochs)


def value_of(curve: list[tuple[int, float]], at: str, best_epoch: float | None) -> float | None:
    """An epoch metric's value: at the best checkpoint's epoch (`best`) or its last logged value (`last`)."""
    if not curve:
        return None
    return at_best_epoch(curve, best_epoch) if at == "best" else curve[-1][1]


def last_epoch_mean(curve: list[tuple[int, float]], epochs: int | None) -> float | None:
    """The mean of a per-step metric over the run's last epoch: the values logged after (epochs - 1) / epochs of its
    last step (every epoch has as many steps, and the engine logs each epoch's last step). A single step's gradient
    norm is noise; an epoch's mean is what the run ended with. Epochs unknown: the last value."""
    if not curve:
        return None
    if not epochs or epochs < 1:
        return curve[-1][1]
    end = curve[-1][0]
    return statistics.fmean(v for step, v in curve if step > end * (epochs - 1) / epochs or step == end)


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
    """By depth within a sweep, epoch count, family and `by` value; several sweeps stay apart, the latest first, then
    the runs outside a sweep."""
    sweep, epochs, kind, group = row.line
    return (not sweep, -newest.get(sweep, 0.0), sweep, epochs, kind, group, row.depth is None, row.depth or 0,
            row.backbone, row.run_id)


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
