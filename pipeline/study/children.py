"""A sweep's children: what each one is (its swept values, its folder), how it runs (in this process, or as a
`pipeline run` process of its own for --jobs and --ray), and what it came to, read back from its MLflow run.

A child run as a process gets the same arguments as one run in this process (`runner.run`): the task file, the fixed
overrides, its swept values, its output folder, `--parent-run-id` and its swept values as `--tag`s, so the runs, tags
and folders a parallel sweep leaves are those of a sequential one. Its console goes to `console.log` in its folder; the
runner writes `run.log` there too.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.study.launch import CONSOLE  # a child process's own stdout and stderr, in its folder
from pipeline.study.settled import Verdict, judge
from pipeline.tasks.metric import Metric
from pipeline.train import checkpoint, runner

log = logging.getLogger(__name__)



@dataclass
class Child:
    values: dict[str, str]  # swept key -> value, as typed
    status: str = "PENDING"  # FINISHED, FAILED, KILLED, or SKIPPED (finished in an earlier sweep)
    run_id: str = ""
    best: float | None = None
    wall_time: float | None = None
    error: str = ""
    settled: Verdict | None = None  # whether its primary metric had stopped improving


@dataclass(frozen=True)
class Spec:
    """One child to run: its place in the sweep, its swept values and the arguments it gets."""

    index: int  # 1-based
    total: int
    values: dict[str, str]
    output_dir: Path
    overrides: tuple[str, ...]  # the fixed ones, then its swept values, then its output folder
    resume: bool  # continue from the last.pt an interrupted earlier attempt left

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.total}] {' '.join(f'{k}={v}' for k, v in self.values.items())}"

    @property
    def name(self) -> str:
        """The run in lines said about it: its swept values."""
        return " ".join(self.values.values())


def spec(index: int, total: int, values: dict[str, str], fixed: list[str], output_dir: Path, resume: bool) -> Spec:
    # A finished child keeps no weights of its own: its MLflow run holds them, which compare, predict (runs:/...) and
    # serving read; its last.pt lasts until it finishes, for --resume. A fixed train.keep_checkpoints wins.
    keep = [] if any(arg.startswith("train.keep_checkpoints=") for arg in fixed) else ["train.keep_checkpoints=none"]
    overrides = (*keep, *fixed, *(f"{k}={v}" for k, v in values.items()), f"train.output_dir={output_dir}")
    # An interrupted child continues in its own MLflow run from its last checkpoint.
    return Spec(index, total, values, output_dir, overrides, resume and (output_dir / checkpoint.LAST).exists())


def run_here(task_file: str | Path, child: Spec, parent_id: str, primary: Metric) -> Child:
    """Run the child in this process (a sequential sweep); a failure is said and kept, the sweep goes on."""
    log.info(f"\n{child.label} -> {child.output_dir}" + (" (continuing)" if child.resume else ""))
    try:
        result = runner.run(task_file, child.overrides, resume=child.resume, parent_run_id=parent_id,
                            tags=child.values)
    except Exception as err:  # noqa: BLE001 - the runner marked the child FAILED; the sweep goes on
        found = Child(child.values, "FAILED", error=one_line(err))
        log.info(f"{child.label} FAILED: {found.error}")
        return found
    return Child(child.values, "FINISHED", result.run_id, result.best, result.wall_time,
                 settled=judge(result.curve, primary))


def command(task_file: str | Path, child: Spec, parent_id: str, gpus: int = 1) -> list[str]:
    """`pipeline run` for the child as a process of its own; on several GPUs, under torchrun (one process per GPU)."""
    head = [sys.executable, "-m", "pipeline", "run"]
    if gpus > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
                "pipeline", "run"]
    tags = [arg for k, v in child.values.items() for arg in ("--tag", f"{k}={v}")]
    return [*head, str(Path(task_file).resolve()), *child.overrides, "--parent-run-id", parent_id, *tags,
            *(["--resume"] if child.resume else [])]


def collect(uri: str, experiment: str, parent_id: str, child: Spec, returncode: int, primary: Metric,
            reason: str = "") -> Child:
    """What a child process came to, from its MLflow run (the newest child of the parent with its swept values) and,
    when it failed, the error line of its console."""
    run = find_run(uri, experiment, parent_id, child.values)
    if returncode == 0 and run is not None and run.status == "FINISHED":
        history = [v for _, v in tracking.metric_history(uri, run.run_id, primary.name)]
        return Child(child.values, "FINISHED", run.run_id, run.metrics.get(primary.best_key), run.wall_time,
                     settled=judge(history, primary) if history else None)
    error = reason or error_line(child.output_dir / CONSOLE) or f"exited with code {returncode}"
    if run is not None and run.status == "RUNNING":  # it died before it could say so itself
        tracking.mark_failed(uri, run.run_id, error)
    return Child(child.values, "KILLED" if returncode in (-2, 130) else "FAILED", run.run_id if run else "",
                 error=error)


def find_run(uri: str, experiment: str, parent_id: str, values: dict[str, str]) -> tracking.RunRecord | None:
    try:
        runs = tracking.search_runs(uri, experiment, parent_run_id=parent_id)
    except UserError:  # no experiment yet: the child failed before its run existed
        return None
    mine = [r for r in runs if all(r.tags.get(k) == v for k, v in values.items())]
    return mine[-1] if mine else None


def error_line(console: Path) -> str:
    """The `error: ...` line the CLI printed, else the last exception line of a traceback, else the last line, of a
    child's console."""
    try:
        lines = [line.strip() for line in console.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or raised or lines or [""])[-1][:300]


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, UserError) else text
