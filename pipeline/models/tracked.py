"""Backbone weights kept in MLflow: `model.backbone.weights=runs:/<run id>` (that run's best checkpoint, of any task: a
classification run's backbone starts a detection, segmentation or face run) and `models:/<name>/<version>` or
`models:/<name>@<alias>` (a registered version: its run's best checkpoint).

They are read from the run's own tracking store (tracking.uri, MLFLOW_TRACKING_URI, sqlite:///mlflow.db), which the
task's model builder does not know: the checkpoint is fetched and checked here (`fetch`), the runner hands it to the
builder as a file, which the backbone loads as any checkpoint of this pipeline (pipeline/models/weights.py keeps its
`backbone.body.*` tensors and names the rest, the other task's head, as skipped), and `relabel` makes the backbone's
lineage name the URI as given and the producing run. A user's own weights never fall back to random init: every
problem is one `UserError`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.models import backbones
from pipeline.models import weights as W
from pipeline.models.backbones import Backbone

WHAT = "model.backbone.weights"
REACH_TIMEOUT = 3.0  # seconds: an unreachable tracking server fails the run now, not after MLflow's minutes of retries


@dataclass(frozen=True)
class Fetched:
    source: str  # model.backbone.weights as given
    run_id: str  # the run whose best checkpoint it is
    path: Path  # that checkpoint, in a temporary folder while `fetch` lasts


def relabel(backbone: Backbone, fetched: Fetched) -> None:
    """A backbone built from the fetched file names the weights as given (`runs:/...`) and their run, not the
    temporary file; one whose task replaced its weights (detection's `coco` init) is left as it is."""
    if backbone.weights == str(fetched.path):
        backbone.weights = backbone.lineage.source = fetched.source
        backbone.lineage.run_id = fetched.run_id


@contextmanager
def fetch(source: str, uri: str, backbone: str) -> Iterator[Fetched]:
    """The best checkpoint behind `source` as a local file, checked to fit backbone `backbone`; the file is removed
    when the block ends. Refused: an unreachable store, an unknown run, model, version or alias, a run still RUNNING,
    a run without checkpoint, a checkpoint of another architecture."""
    with ExitStack() as stack:
        with _named():
            tracking.check_reachable(uri, timeout=REACH_TIMEOUT)
            ref = tracking.resolve_source(source, uri)
            run = tracking.get_run(uri, ref.run_id)
            if run.status == "RUNNING":
                raise UserError(f"run {ref.run_id} is still RUNNING, and its best checkpoint is logged when it ends; "
                                "wait for it to finish, or give its best.pt file")
            path = stack.enter_context(tracking.downloaded(uri, ref))
            found = W.read_weights(path, what=f"{source} (run {ref.run_id}, {ref.artifact})")
            if found.task is None:
                raise UserError(f"{source}: run {ref.run_id}'s {ref.artifact} is not a checkpoint of this pipeline "
                                "(no config inside); give a run trained by 'pipeline run'")
            of = " ".join(v for v in (run.tags.get("backbone"), found.task) if v)
            backbones.check_fits(backbone, found.tensors, f"{source} (a {of} run)")
        yield Fetched(source, ref.run_id, path)


@contextmanager
def _named() -> Iterator[None]:
    """Every refusal names the setting it is about."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{WHAT}: {err}") from None
