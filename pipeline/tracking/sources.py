"""Where a trained model is kept in MLflow: a run id, `runs:/<run id>[/<artifact path>]` or a `models:/` URI (a logged
model `models:/m-...`, or a registered version `models:/<name>/<version>`, `models:/<name>@<alias>`), resolved to a
run and the checkpoint file it logged.

`pipeline predict`, `verify` and `export` load trained models this way (pipeline/use/inference.py), and
`model.backbone.weights` starts a run from one (pipeline/models/tracked.py).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.tracking.models import model_source_run
from pipeline.tracking.query import download_artifact, get_run, has_artifact, logged_model_file

CHECKPOINT_ARTIFACT = "checkpoints/best.pt"  # where the runner logs a run's best checkpoint (tracking.log_checkpoint)
RUNS_PREFIX = "runs:/"
MODELS_PREFIX = "models:/"


def is_tracked(source: str) -> bool:
    """A `runs:/` or `models:/` URI (a bare run id cannot be told from a file name without asking a store)."""
    return source.startswith((RUNS_PREFIX, MODELS_PREFIX))


@dataclass(frozen=True)
class RunFile:
    """One artifact file of one run."""

    run_id: str
    artifact: str


def resolve(source: str, uri: str) -> RunFile:
    """The checkpoint behind `source` in the store at `uri`: a `models:/` URI's source run's best checkpoint;
    `runs:/<id>` that run's best checkpoint (`runs:/<id>/<path>` another of its checkpoints); a bare run id likewise."""
    if source.startswith(MODELS_PREFIX):
        return RunFile(model_source_run(uri, source), CHECKPOINT_ARTIFACT)
    if source.startswith(RUNS_PREFIX):
        run_id, _, artifact = source[len(RUNS_PREFIX):].strip("/").partition("/")
        if not run_id:
            raise UserError(f"'{source}' names no run; write runs:/<run id> (the run page in MLflow's UI shows the id)")
        return RunFile(run_id, artifact or CHECKPOINT_ARTIFACT)
    return RunFile(source, CHECKPOINT_ARTIFACT)


@contextmanager
def downloaded(uri: str, ref: RunFile) -> Iterator[Path]:
    """`ref` copied into a temporary folder, removed when the block ends. A run that logged a model keeps its best
    checkpoint there only (one copy per run, pipeline/train/runner.py); one logged before that, or without a model,
    as its own `checkpoints/best.pt` artifact."""
    run = get_run(uri, ref.run_id)  # a clear error for an unknown run id before looking for its artifacts
    with tempfile.TemporaryDirectory(prefix="pipeline-ckpt-") as tmp:
        if ref.artifact == CHECKPOINT_ARTIFACT and not has_artifact(uri, ref.run_id, CHECKPOINT_ARTIFACT):
            found = logged_model_file(uri, run, ".pt")
            if found is not None:
                yield found.download(tmp)
                return
        yield download_artifact(uri, ref.run_id, ref.artifact, tmp)
