"""`pipeline sweep`: run a task once per combination of swept values, as child runs of one parent MLflow run.

    pipeline sweep tasks/x.yaml model.backbone.name=resnet18,resnet50 train.lr=1e-3,1e-2 train.epochs=5

An override whose value holds a comma outside brackets and quotes is swept (`a=1,2`); the others (`train.epochs=5`,
`"finetune.freeze=[stem,layer1]"`) apply to every child. Children are the cross product of the swept values, run one
after another in this process; each is tagged with its swept values and writes checkpoints to its own folder.
A failing child is marked FAILED by the runner and the sweep goes on; `--resume` skips children already FINISHED.
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
from pipeline.study.settled import Verdict, advice, judge
from pipeline.tasks import registry
from pipeline.tasks.metric import Metric
from pipeline.train import checkpoint, runner

log = logging.getLogger(__name__)

# Tags that mark a sweep's parent run and say which sweep it ran, so that --resume finds it again.
ROLE_TAG = "pipeline.sweep"
SPEC_TAG = "pipeline.sweep_spec"
# Keys a sweep cannot vary: the children must share the parent's store and experiment (data.root names the
# experiment of other data, pipeline/config/placement.py), and each gets its own folder.
_FIXED_KEYS = ("tracking.", "train.output_dir", "task", "data.root")


@dataclass
class Child:
    values: dict[str, str]  # swept key -> value, as typed
    status: str = "PENDING"  # FINISHED, FAILED, KILLED, or SKIPPED (finished in an earlier sweep)
    run_id: str = ""
    best: float | None = None
    wall_time: float | None = None
    error: str = ""
    settled: Verdict | None = None  # whether its primary metric had stopped improving


@dataclass
class SweepResult:
    parent_run_id: str
    primary: Metric
    children: list[Child]

    @property
    def failed(self) -> list[Child]:
        return [c for c in self.children if c.status not in ("FINISHED", "SKIPPED")]


def run(task_file: str | Path, args: tuple[str, ...], resume: bool = False) -> SweepResult:
    """Run every combination of the swept values in `args`; the last lines said are a summary table.

    Raises `UserError` after the summary when any child failed, which also marks the parent run FAILED.
    """
    fixed, swept = parse_args(args)
    tracking.quiet_console()  # MLflow's INFO lines stay in the runs' logs
    combos = [dict(zip(swept, values)) for values in itertools.product(*swept.values())]
    cfg = _validate(task_file, fixed, combos)
    experiment = placement.experiment(task_file, cfg)  # the children's: other data than the file's gets its own
    uri = tracking.resolve_uri(cfg.tracking.uri)
    parent = _open_parent(uri, experiment, cfg.task, task_file, fixed, swept, resume)
    log.info(f"sweep of {len(combos)} runs under parent run {parent.run_id} in experiment '{experiment}'")
    # one folder per sweep, so that no sweep overwrites or resumes another one's checkpoints
    base_dir = Path(cfg.train.output_dir or f"outputs/{experiment}") / f"sweep-{parent.run_id[:8]}"
    primary = registry.entry(cfg.task).primary
    with parent:  # FAILED when a child failed (the UserError below), KILLED on Ctrl-C
        done = _finished_children(uri, experiment, parent.run_id) if resume else []
        children = []
        for i, combo in enumerate(combos, start=1):
            label = f"[{i}/{len(combos)}] {' '.join(_overrides(combo))}"
            previous = next((r for r in done if all(r.tags.get(k) == v for k, v in combo.items())), None)
            if previous is not None:
                log.info(f"{label}: FINISHED earlier in run {previous.run_id}, skipped")
                children.append(_from_record(uri, combo, previous, primary))
            else:
                children.append(_run_child(task_file, fixed, combo, label, base_dir / child_dir_name(combo),
                                           parent.run_id, resume, primary))
        result = SweepResult(parent.run_id, primary, children)
        parent.set_experiment_tags(tracking.view_tags(runner.ui_metrics(cfg, primary), order_by="model/depth",
                                                      key=tracking.sweep_view(parent.run_id),
                                                      parent_run_id=parent.run_id))
        log.info(summary(result))
        log.info(links(uri, parent.experiment_id, result))
        if result.failed:
            raise UserError(f"{len(result.failed)} of {len(children)} sweep runs failed (table above); fix the cause "
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


def _run_child(task_file, fixed: list[str], combo: dict[str, str], label: str, output_dir: Path, parent_id: str,
               resume: bool, primary: Metric) -> Child:
    child = Child(values=combo)
    # An interrupted child continues in its own MLflow run from its last checkpoint.
    continue_child = resume and (output_dir / checkpoint.LAST).exists()
    log.info(f"\n{label} -> {output_dir}" + (" (continuing)" if continue_child else ""))
    # A finished child keeps no weights of its own: its MLflow run holds them, which compare, predict (runs:/...) and
    # serving read; its last.pt lasts until it finishes, for --resume. A fixed train.keep_checkpoints wins.
    keep = [] if any(arg.startswith("train.keep_checkpoints=") for arg in fixed) else ["train.keep_checkpoints=none"]
    try:
        result = runner.run(task_file, (*keep, *fixed, *_overrides(combo), f"train.output_dir={output_dir}"),
                            resume=continue_child, parent_run_id=parent_id, tags=combo)
    except Exception as err:  # noqa: BLE001 - the runner marked the child FAILED; the sweep goes on
        child.status, child.error = "FAILED", _one_line(err)
        log.info(f"{label} FAILED: {child.error}")
        return child
    child.status, child.run_id, child.best, child.wall_time = "FINISHED", result.run_id, result.best, result.wall_time
    child.settled = judge(result.curve, primary)
    return child


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


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, UserError) else text


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
