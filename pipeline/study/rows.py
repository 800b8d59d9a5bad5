"""A compared run as one row: what `pipeline compare` reads back from MLflow (pipeline/study/compare.py), prints as a
table or CSV here, and draws (pipeline/study/plots.py)."""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.study.settled import Verdict

# What the engine logs per optimizer step (MLflow step = optimizer step): read as the mean of the last epoch's values.
PER_STEP_PREFIXES = ("grad_norm/", "lr/")
PER_STEP_NAMES = ("train/loss",)
# Logged, but no quantity to compare against depth: run constants (already columns) and unfreezing markers.
NOT_COMPARED = ("model/", "unfreeze/")


@dataclass
class Row:
    run_id: str
    backbone: str
    depth: int | None
    num_params: int | None
    gflops: float | None
    values: dict[str, float | None]  # each compared metric, read as `at` says; None: the run did not log it
    throughput: float | None  # median training img/s over epochs
    wall_time: float | None
    parent_run_id: str | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)
    per_step: dict[str, bool] = field(default_factory=dict)  # metric -> its steps are optimizer steps, not epochs
    group: str | None = None  # the run's value of the `by` tag or param
    epochs: int | None = None  # train.epochs as configured
    settled: Verdict | None = None  # whether the primary metric had stopped improving (pipeline/study/settled.py)

    @property
    def value(self) -> float | None:
        """The first compared metric."""
        return next(iter(self.values.values()), None)

    @property
    def curve(self) -> list[tuple[int, float]]:
        return next(iter(self.curves.values()), [])

    @property
    def family(self) -> str:
        return family(self.backbone)

    @property
    def line(self) -> tuple[str, int, str, str]:
        """What a plot line holds in common: sweep, epochs, backbone family and `by` value (sortable text and
        numbers)."""
        return self.parent_run_id or "", self.epochs or 0, self.family, self.group or ""


def better(metric: str) -> int:
    """1 when higher is better (accuracy, mAP, IoU), -1 when lower is (loss, error), 0 when neither is (a gradient
    norm, a learning rate)."""
    if metric.startswith(PER_STEP_PREFIXES):
        return 0
    leaf = metric.rsplit("/", 1)[-1].lower()
    return -1 if "loss" in leaf or "err" in leaf else 1


def family(backbone: str) -> str:
    """The backbone's name without its depth and what follows: cifar_plain56 -> cifar_plain, cifar_resnet20 ->
    cifar_resnet, resnext50_32x4d -> resnext, wide_resnet50_2 -> wide_resnet, densenet121 -> densenet; a name without
    digits is its own family."""
    return re.match(r"\D*", backbone).group().rstrip("_-.") or backbone




def table(rows: list[Row], readings: dict[str, str], by: str | None = None) -> str:
    """Names left-aligned, numbers right-aligned; one column per metric, headed by which value it holds (`val/top1
    (best epoch)`); a `sweep` column only when the rows come from several sweeps (or from single runs and sweeps), so
    that two rows of one backbone are told apart."""
    columns = [("backbone", [r.backbone for r in rows], True)]
    if by:
        columns.append((by, [r.group or "-" for r in rows], True))
    columns += [("depth", [_fmt(r.depth) for r in rows], False),
                ("epochs", [_fmt(r.epochs) for r in rows], False),
                ("params", [_fmt(r.num_params, "{:,}") for r in rows], False),
                ("GFLOPs", [_fmt(r.gflops, "{:.2f}") for r in rows], False)]
    columns += [(f"{m} ({how})", [number(r.values.get(m), 4) for r in rows], False) for m, how in readings.items()]
    if any(r.settled is not None for r in rows):
        columns.append(("settled", [r.settled.cell if r.settled else "-" for r in rows], True))
    columns += [("train img/s", [_fmt(r.throughput, "{:.0f}") for r in rows], False),
                ("wall time", [_fmt(r.wall_time, "{:.0f}s") for r in rows], False)]
    if len({r.parent_run_id for r in rows}) > 1:
        columns.append(("sweep", [sweep_label(r.parent_run_id) for r in rows], True))
    columns.append(("run id", [r.run_id for r in rows], True))
    widths = [max(len(head), *(len(v) for v in values)) for head, values, _ in columns]
    lines = []
    for i in range(len(rows) + 1):
        cells = [(head if i == 0 else values[i - 1], left) for head, values, left in columns]
        lines.append("  ".join(c.ljust(w) if left else c.rjust(w) for (c, left), w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def _fmt(value, pattern: str = "{}") -> str:
    return "-" if value is None else pattern.format(value)


def number(value: float | None, digits: int) -> str:
    """Fixed decimals for the usual range (0.9512); significant digits for tiny or huge values (a vanishing gradient
    norm of 3.2e-05 would print as 0.0000)."""
    if value is None:
        return "-"
    fixed = value == 0 or not math.isfinite(value) or 10 ** -(digits - 1) <= abs(value) < 10 ** (digits + 1)
    return f"{value:.{digits}f}" if fixed else f"{value:.{digits}g}"


def sweep_label(parent_run_id: str | None) -> str:
    return parent_run_id[:8] if parent_run_id else "-"


def write_csv(rows: list[Row], readings: dict[str, str], path: Path, by: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "backbone", *([by] if by else []), "depth", "epochs", "num_params", "gflops",
                         *(f"{m} ({how})" for m, how in readings.items()), "settled", "train_img_s",
                         "wall_time_s", "parent_run_id"])
        for r in rows:
            writer.writerow([r.run_id, r.backbone, *([r.group] if by else []), r.depth, r.epochs, r.num_params,
                             r.gflops, *(r.values.get(m) for m in readings),
                             "" if r.settled is None else r.settled.settled, r.throughput, r.wall_time,
                             r.parent_run_id or ""])
    return path
