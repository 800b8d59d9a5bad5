"""`pipeline sweep`: run a task once per combination of swept values, as child runs of one parent MLflow run.

    pipeline sweep tasks/x.yaml model.backbone.name=resnet18,resnet50 train.lr=1e-3,1e-2 train.epochs=5

An override whose value holds a comma outside brackets and quotes is swept (`a=1,2`); the others (`train.epochs=5`,
`"finetune.freeze=[stem,layer1]"`) apply to every child. Children are the cross product of the swept values, run one
after another in this process, or as processes of their own: `--jobs N` at a time on this machine's GPUs or cores
(pipeline/study/jobs.py), or as Ray tasks on a cluster with `--ray ADDRESS` (pipeline/study/on_ray.py). Each is tagged
with its swept values and works in its own folder (pipeline/study/children.py). A failing child is marked FAILED and
the sweep goes on; `--resume` skips children already FINISHED and continues interrupted ones.
"""
from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline import config, tracking
from pipeline.config import placement
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.study import children, on_ray
from pipeline.study import jobs as jobs_
from pipeline.study.children import Child
from pipeline.study.settled import advice, judge
from pipeline.tasks import registry
from pipeline.tasks.metric import Metric
from pipeline.train import runner

log = logging.getLogger(__name__)

# Tags that mark a sweep's parent run and say which sweep it ran, so that --resume finds it again.
ROLE_TAG = "pipeline.sweep"
SPEC_TAG = "pipeline.sweep_spec"
# Keys a sweep cannot vary: the children must share the parent's store and experiment (data.root names the
# experiment of other data, pipeline/config/placement.py), and each gets its own folder.
_FIXED_KEYS = ("tracking.", "train.output_dir", "task", "data.root", "sweep.")


@dataclass
class SweepResult:
    parent_run_id: str
    primary: Metric
    children: list[Child]

    @property
    def failed(self) -> list[Child]:
        return [c for c in self.children if c.status not in ("FINISHED", "SKIPPED")]


def run(task_file: str | Path, args: tuple[str, ...], resume: bool = False, jobs: int | None = None,
        ray: str | None = None) -> SweepResult:
    """Run every combination of the swept values in `args`, one after another, `jobs` at a time, or on Ray at
    address `ray`; the last lines said are a summary table.

    Raises `UserError` after the summary when any child failed, which also marks the parent run FAILED.
    """
    if jobs is not None and ray is not None:
        raise UserError("--jobs and --ray both say how to run the children; give one of them (Ray decides how many "
                        "run at once from the resources each asks for)")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give the number of children to run at once, 1 or more")
    fixed, swept = parse_args(args)
    tracking.quiet_console()  # MLflow's INFO lines stay in the runs' logs
    combos = [dict(zip(swept, values)) for values in itertools.product(*swept.values())]
    cfg = _validate(task_file, fixed, combos)
    experiment = placement.experiment(task_file, cfg)  # the children's: other data than the file's gets its own
    uri = tracking.resolve_uri(cfg.tracking.uri)
    if ray is not None:
        on_ray.check(ray, uri)
    if jobs is not None and jobs > len(combos):
        log.info(f"note: --jobs {jobs} for {len(combos)} runs: {len(combos)} at once")
        jobs = len(combos)
    parent = _open_parent(uri, experiment, cfg.task, task_file, fixed, swept, resume)
    log.info(f"sweep of {len(combos)} runs under parent run {parent.run_id} in experiment '{experiment}'")
    # one folder per sweep, so that no sweep overwrites or resumes another one's checkpoints
    base_dir = Path(cfg.train.output_dir or f"outputs/{experiment}") / f"sweep-{parent.run_id[:8]}"
    primary = registry.entry(cfg.task).primary
    with parent:  # FAILED when a child failed (the UserError below), KILLED on Ctrl-C
        done = _finished_children(uri, experiment, parent.run_id) if resume else []
        results: dict[int, Child] = {}
        todo = []
        for i, combo in enumerate(combos, start=1):
            child = children.spec(i, len(combos), combo, fixed, base_dir / child_dir_name(combo), resume)
            previous = next((r for r in done if all(r.tags.get(k) == v for k, v in combo.items())), None)
            if previous is not None:
                log.info(f"{child.label}: FINISHED earlier in run {previous.run_id}, skipped")
                results[i] = _from_record(uri, combo, previous, primary)
            else:
                todo.append(child)

        def collect(child: children.Spec, returncode: int, reason: str = "") -> Child:
            return children.collect(uri, experiment, parent.run_id, child, returncode, primary, reason)

        if ray is not None and todo:
            found = on_ray.run_on_ray(ray, task_file, todo, parent.run_id, cfg.sweep.resources.model_dump(),
                                      cfg.sweep.retries, cfg.sweep.gpus_per_child, collect)
        elif jobs is not None and todo:
            places = jobs_.slots(jobs, cfg.sweep.gpus_per_child)
            found = jobs_.run_parallel(task_file, todo, places, parent.run_id, cfg.sweep.gpus_per_child, collect)
        else:
            found = [children.run_here(task_file, child, parent.run_id, primary) for child in todo]
        results.update((child.index, c) for child, c in zip(todo, found))
        result = SweepResult(parent.run_id, primary, [results[i] for i in range(1, len(combos) + 1)])
        parent.set_experiment_tags(tracking.view_tags(runner.ui_metrics(cfg, primary), order_by="model/depth",
                                                      key=tracking.sweep_view(parent.run_id),
                                                      parent_run_id=parent.run_id))
        log.info(summary(result))
        log.info(links(uri, parent.experiment_id, result))
        if result.failed:
            raise UserError(f"{len(result.failed)} of {len(combos)} sweep runs failed (table above); fix the cause "
                            f"and rerun the same command with --resume to run only those")
    return result


def _open_parent(uri: str, experiment: str, task: str, task_file: str | Path, fixed: list[str],
                 swept: dict[str, list[str]], resume: bool) -> tracking.Tracker:
    """A new parent run, or with `resume` the latest parent of the same sweep (same task file and arguments)."""
    spec = " ".join([str(task_file), *fixed, *(f"{k}={','.join(v)}" for k, v in swept.items())])
    previous = _previous_parent(uri, experiment, spec) if resume else None
    if resume:
        log.info(f"--resume: reopening sweep {previous}" if previous else
            f"--resume: no earlier sweep with these arguments in experiment '{experiment}'; starting a new one")
    return tracking.Tracker.start(
        uri, experiment, run_name=f"sweep-{datetime.now():%Y%m%d-%H%M%S}",
        params={f"sweep.{k}": ",".join(v) for k, v in swept.items()},
        tags={ROLE_TAG: "parent", SPEC_TAG: spec, "task": task, "task_file": str(task_file)}, run_id=previous)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(args: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `key=value` arguments into fixed overrides and swept keys with their values, in the order given."""
    fixed: list[str] = []
    swept: dict[str, list[str]] = {}
    seen: set[str] = set()
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise UserError(f"sweep argument '{arg}' is not of the form key.path=value or key.path=v1,v2,...")
        if key in seen:
            raise UserError(f"sweep argument '{arg}': key '{key}' is given twice; give it once, with all its values")
        seen.add(key)
        values = split_values(text)
        if len(values) == 1:
            fixed.append(arg)
            continue
        if any(v.strip() == "" for v in values):
            raise UserError(f"sweep argument '{arg}' has an empty value in its list; write key=v1,v2,... "
                            "with no empty entries")
        if key.startswith(_FIXED_KEYS):
            raise UserError(f"sweep argument '{arg}': {key} cannot be swept (every child shares the parent's "
                            "tracking store, experiment and data, and gets its own output folder); give one value")
        swept[key] = [v.strip() for v in values]
    if not swept:
        raise UserError("sweep: nothing to sweep; give at least one key with several values, e.g. "
                        "model.backbone.name=resnet18,resnet34")
    return fixed, swept


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `a,[b,c],'d,e'` -> `a`, `[b,c]`, `'d,e'`. `""` -> `[""]`."""
    parts, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return parts + [current]


def _validate(task_file: str | Path, fixed: list[str], combos: list[dict[str, str]]) -> config.TaskConfig:
    """Check every child's config (unknown keys, bad values, unknown backbones) before anything trains."""
    configs = [config.load(task_file, [*fixed, *_overrides(combo)]) for combo in combos]
    for cfg in configs:
        backbones.check_name(cfg.model.backbone.name)
    return configs[0]


def _overrides(combo: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in combo.items()]


# ---------------------------------------------------------------------------------------------------------------------
# Children


def child_dir_name(combo: dict[str, str]) -> str:
    """A folder name from the swept values: {model.backbone.name: resnet18, train.lr: 0.01} -> name=resnet18_lr=0.01."""
    name = "_".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in combo.items())
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", name)


def _from_record(uri: str, combo: dict[str, str], record: tracking.RunRecord, primary: Metric) -> Child:
    best = record.metrics.get(primary.best_key)  # the runner logs the best checkpoint's score there
    history = [v for _, v in tracking.metric_history(uri, record.run_id, primary.name)]
    return Child(values=combo, status="SKIPPED", run_id=record.run_id, best=best, wall_time=record.wall_time,
                 settled=judge(history, primary) if history else None)


def _previous_parent(uri: str, experiment: str, spec: str) -> str | None:
    """The latest parent run of the same sweep (same task file and arguments), if the store has one."""
    try:
        runs = tracking.search_runs(uri, experiment)
    except UserError:  # no such experiment yet: nothing to resume
        return None
    parents = [r for r in runs if r.tags.get(ROLE_TAG) == "parent" and r.tags.get(SPEC_TAG) == spec]
    return parents[-1].run_id if parents else None


def _finished_children(uri: str, experiment: str, parent_id: str) -> list[tracking.RunRecord]:
    return [r for r in tracking.search_runs(uri, experiment, parent_run_id=parent_id) if r.status == "FINISHED"]


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def links(uri: str, experiment_id: str, result: SweepResult) -> str:
    """The MLflow UI page of the sweep: its children's charts, the metric against depth first (`view_tags`)."""
    link = tracking.experiment_link(tracking.ui_address(uri), experiment_id, tracking.sweep_view(result.parent_run_id))
    return f"MLflow UI: {link}{tracking.start_hint(uri)}"


def summary(result: SweepResult) -> str:
    keys = list(result.children[0].values) if result.children else []
    header = [*keys, "status", f"best {result.primary}", "settled", "time", "run id"]
    rows = [header]
    for c in result.children:
        best = f"{c.best:.4f}" if c.best is not None else "-"
        took = f"{c.wall_time:.0f}s" if c.wall_time is not None else "-"
        rows.append([*c.values.values(), c.status, best, c.settled.cell if c.settled else "-", took, c.run_id or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    for c in result.children:
        if c.settled is not None and not c.settled.settled:
            lines.append(advice(" ".join(c.values.values()), c.settled, result.primary.name))
    for c in result.failed:
        lines.append(f"FAILED {' '.join(_overrides(c.values))}: {c.error}")
    return "\n".join([f"\nsweep {result.parent_run_id}:", *lines])
