"""`pipeline sync RUN_DIR`: the records a run kept while its tracking server was unreachable, sent once it is back."""
from __future__ import annotations

from pathlib import Path

import mlflow

from pipeline.errors import UserError
from pipeline.tracking.outbox import NAME as OUTBOX
from pipeline.tracking.outbox import Outbox
from pipeline.tracking.query import get_run
from pipeline.tracking.run import Tracker
from pipeline.tracking.uri import check_reachable


def sync(run_dir: Path, uri: str | None = None) -> int:
    """`pipeline sync RUN_DIR`: send the records a run kept while its tracking server was unreachable."""
    path = Path(run_dir) / OUTBOX
    if not path.exists():
        raise UserError(f"{path} not found: nothing to sync (a run keeps records there only while its tracking "
                        f"server is unreachable)")
    try:
        box = Outbox.read(path)
    except (ValueError, OSError) as err:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path} is damaged ({err}); it cannot be synced") from None
    box.uri = uri or box.uri
    check_reachable(box.uri)
    tracker = Tracker(mlflow.MlflowClient(box.uri), box.run_id, get_run(box.uri, box.run_id).experiment_id)
    tracker._outbox = box
    count = len(box.pending)
    if not tracker.flush(force=True, quiet=True):
        raise UserError(f"sending {path} to {box.uri} failed part way; {len(box.pending)} records are left in it, "
                        f"run 'pipeline sync {run_dir}' again")
    return count
