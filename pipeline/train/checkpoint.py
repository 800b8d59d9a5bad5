"""Checkpoints: written atomically (temp file, fsync, rename), read with `weights_only=True`, and what a run keeps.

A run folder holds `best.pt` (the best epoch's model weights and fit state, no optimizer: what predict, export and
`runs:/` weights read) and, while training, `last.pt` (model, optimizer, grad scaler, RNG: what --resume needs).
`train.keep_checkpoints` says what stays once the run has finished:

- `none`: no weights; the run's MLflow store holds its best weights (the logged model, else `checkpoints/best.pt`),
  which `runs:/<run id>` and `models:/` reach: a sweep's children keep this by default;
- `best`: best.pt only (resnet18: 45 MB); the finished run can no longer be continued with --resume;
- `last` (default): best.pt and last.pt (resnet18 with AdamW: 45 + 134 MB), so a finished run can be continued with
  more epochs;
- `all`: also `last.prev.pt`, the checkpoint before last.pt, kept through training too.

`last.prev.pt` is not needed for crashes: `save` never leaves a half-written file behind (the old one stays until the
new one is complete on disk), so a run killed while saving resumes from the previous last.pt. It only helps when a
complete last.pt is damaged afterwards (a failing disk, a copy cut short), which `all` guards against at the price of
one more last.pt.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.models.weights import load_error_reason

log = logging.getLogger(__name__)

LAST = "last.pt"
PREVIOUS = "last.prev.pt"  # the checkpoint before `last.pt`, with keep_checkpoints=all (see the module docstring)
BEST = "best.pt"
KEEP = ("none", "best", "last", "all")


def save(state: dict, path: Path, keep_previous: bool = False) -> None:
    """A reader sees the old file or the new one, never half of one: a crash mid-write leaves the old checkpoint.

    With `keep_previous`, the file being replaced is kept as `last.prev.pt` (see `load_resumable`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.parent / PREVIOUS)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_last(state: dict, folder: Path, keep: str = "last") -> None:
    """Write `last.pt`; with keep `all` the one it replaces becomes `last.prev.pt`. Otherwise a `last.prev.pt` left by
    an earlier run in the folder goes, so that a resume can never fall back to another run's state."""
    save(state, folder / LAST, keep_previous=keep == "all")
    if keep != "all":
        (folder / PREVIOUS).unlink(missing_ok=True)


def prune(folder: Path, keep: str) -> None:
    """At the end of a finished run: remove what `keep` does not keep (best: last.pt and last.prev.pt; none: best.pt
    too, once the tracking store holds it)."""
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r}: one of {', '.join(KEEP)}")
    drop = {"none": (LAST, PREVIOUS, BEST), "best": (LAST, PREVIOUS), "last": (PREVIOUS,), "all": ()}[keep]
    for name in drop:
        (folder / name).unlink(missing_ok=True)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' not found; run without --resume to start a new run") from None
    except Exception as err:  # truncated or foreign files fail in many ways
        raise UserError(f"checkpoint '{path}' is unreadable ({load_error_reason(err)}); delete it to start over") \
            from None


def load_resumable(folder: Path) -> dict:
    """The newest complete checkpoint in `folder`: `last.pt`, else (missing, truncated, corrupt) `last.prev.pt`."""
    try:
        return load(folder / LAST)
    except UserError as err:
        if not (folder / PREVIOUS).exists():
            raise
        log.warning(f"{err}; resuming from the previous checkpoint {folder / PREVIOUS} instead")
        return load(folder / PREVIOUS)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: keep it as a tensor.
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
